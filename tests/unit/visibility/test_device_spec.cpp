// Device specs (`auto|cuda|cuda:N|cpu|GPU-<uuid>`), the lookup of a GPU by UUID prefix, and the
// narrowing of a visibility to the GPU a setting names (restrict_to_device).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "gpuslot/visibility.hpp"
#include "unit/visibility/hand_made_snapshots.hpp"

namespace gpuslot {
namespace {

struct Accepted {
  const char* name;
  const char* text;
  DeviceSpec::Kind kind;
  unsigned ordinal = 0;
  const char* uuid_prefix = "";
};

std::ostream& operator<<(std::ostream& out, const Accepted& a) { return out << a.name; }

const Accepted kAccepted[] = {
    {"auto", "auto", DeviceSpec::Kind::automatic},
    {"auto_upper_case", "AUTO", DeviceSpec::Kind::automatic},
    {"auto_surrounding_white_space", " \tauto\n", DeviceSpec::Kind::automatic},
    {"cuda_any", "cuda", DeviceSpec::Kind::cuda_any},
    {"cuda_mixed_case", "Cuda", DeviceSpec::Kind::cuda_any},
    {"cuda_zero", "cuda:0", DeviceSpec::Kind::cuda_ordinal, 0},
    {"cuda_seven", "cuda:7", DeviceSpec::Kind::cuda_ordinal, 7},
    {"cuda_upper_case_two_digits", "CUDA:12", DeviceSpec::Kind::cuda_ordinal, 12},
    {"cuda_leading_zero_is_decimal", "cuda:01", DeviceSpec::Kind::cuda_ordinal, 1},
    {"cuda_largest_unsigned", "cuda:4294967295", DeviceSpec::Kind::cuda_ordinal, 4294967295u},
    {"cuda_ordinal_trailing_white_space", "cuda:3  ", DeviceSpec::Kind::cuda_ordinal, 3},
    {"cpu", "cpu", DeviceSpec::Kind::cpu},
    {"cpu_upper_case", "CPU ", DeviceSpec::Kind::cpu},
    {"uuid_prefix", "GPU-8f2c", DeviceSpec::Kind::uuid, 0, "GPU-8f2c"},
    {"uuid_full", "GPU-8f2c1a00-1111-4222-8333-444444444400", DeviceSpec::Kind::uuid, 0,
     "GPU-8f2c1a00-1111-4222-8333-444444444400"},
    {"uuid_stored_in_nvml_spelling", "gpu-8F2C", DeviceSpec::Kind::uuid, 0, "GPU-8f2c"},
    {"uuid_single_dash_after_prefix", "GPU--", DeviceSpec::Kind::uuid, 0, "GPU--"},
};

class DeviceSpecAccepted : public testing::TestWithParam<Accepted> {};

TEST_P(DeviceSpecAccepted, Parses) {
  const Accepted& a = GetParam();
  const Result<DeviceSpec> spec = parse_device_spec(a.text);
  ASSERT_TRUE(spec.ok()) << spec.error().message;
  EXPECT_EQ(spec->kind, a.kind);
  EXPECT_EQ(spec->ordinal, a.ordinal);
  EXPECT_EQ(spec->uuid_prefix, a.uuid_prefix);
}

INSTANTIATE_TEST_SUITE_P(Forms, DeviceSpecAccepted, testing::ValuesIn(kAccepted),
                         [](const testing::TestParamInfo<Accepted>& row) { return std::string(row.param.name); });

struct Rejected {
  const char* name;
  std::string text;
};

std::ostream& operator<<(std::ostream& out, const Rejected& r) { return out << r.name; }

const Rejected kRejected[] = {
    {"empty", ""},
    {"white_space_only", "  "},
    {"gpu_is_not_a_synonym", "gpu"},
    {"bare_integer_is_not_cuda_n", "0"},
    {"cuda_colon_without_ordinal", "cuda:"},
    {"cuda_letter_ordinal", "cuda:x"},
    {"cuda_negative_ordinal", "cuda:-1"},
    {"cuda_plus_sign", "cuda:+1"},
    {"cuda_space_after_colon", "cuda: 1"},
    {"cuda_space_before_colon", "cuda :1"},
    {"cuda_fractional_ordinal", "cuda:1.0"},
    {"cuda_ordinal_overflows_unsigned", "cuda:4294967296"},
    {"cuda_two_ordinals", "cuda:0,1"},
    {"gpu_prefix_alone", "GPU-"},
    {"uuid_with_non_hex", "GPU-xyz"},
    {"uuid_with_mig_suffix", "GPU-8f2c/1/0"},
    {"mig_uuid", "MIG-4a1b2c3d"},
    {"keyword_with_suffix", "autox"},
    {"two_keywords", "cuda,cpu"},
    {"nul_inside", std::string("cpu\0x", 5)},
};

class DeviceSpecRejected : public testing::TestWithParam<Rejected> {};

TEST_P(DeviceSpecRejected, SaysWhatIsAccepted) {
  const Rejected& r = GetParam();
  const Result<DeviceSpec> spec = parse_device_spec(r.text);
  ASSERT_FALSE(spec.ok());
  EXPECT_EQ(spec.error().code, Errc::bad_input);
  const std::string& message = spec.error().message;
  EXPECT_EQ(message.rfind("invalid device '", 0), 0u) << message;
  EXPECT_NE(message.find("': expected auto, cuda, cuda:N, cpu or GPU-<uuid>"), std::string::npos) << message;
  EXPECT_EQ(message.find('\n'), std::string::npos);
}

INSTANTIATE_TEST_SUITE_P(Forms, DeviceSpecRejected, testing::ValuesIn(kRejected),
                         [](const testing::TestParamInfo<Rejected>& row) { return std::string(row.param.name); });

TEST(DeviceSpec, ErrorMessageIsExactlyTheDocumentedLine) {
  const Result<DeviceSpec> spec = parse_device_spec("cuda:x");
  ASSERT_FALSE(spec.ok());
  EXPECT_EQ(spec.error().message, "invalid device 'cuda:x': expected auto, cuda, cuda:N, cpu or GPU-<uuid>");
}

TEST(DeviceSpec, ErrorMessageStaysOneLineForControlCharacters) {
  const Result<DeviceSpec> spec = parse_device_spec("cu\nda");
  ASSERT_FALSE(spec.ok());
  EXPECT_EQ(spec.error().message, "invalid device 'cu\\x0ada': expected auto, cuda, cuda:N, cpu or GPU-<uuid>");
}

TEST(NvmlIndexOfUuidPrefix, FullUuidFindsItsGpu) {
  const Result<unsigned> index = nvml_index_of_uuid_prefix(test::eight_a100s(), test::eight_uuids()[5]);
  ASSERT_TRUE(index.ok());
  EXPECT_EQ(*index, 5u);
}

TEST(NvmlIndexOfUuidPrefix, UniquePrefixFindsItsGpu) {
  const Result<unsigned> index = nvml_index_of_uuid_prefix(test::eight_a100s(), "GPU-1a");
  ASSERT_TRUE(index.ok());
  EXPECT_EQ(*index, 1u);
}

TEST(NvmlIndexOfUuidPrefix, IgnoresCaseAndSurroundingWhiteSpace) {
  const Result<unsigned> index = nvml_index_of_uuid_prefix(test::eight_a100s(), " gpu-7F0B ");
  ASSERT_TRUE(index.ok());
  EXPECT_EQ(*index, 7u);
}

TEST(NvmlIndexOfUuidPrefix, UnknownPrefixSaysSo) {
  const Result<unsigned> index = nvml_index_of_uuid_prefix(test::eight_a100s(), "GPU-zz");
  ASSERT_FALSE(index.ok());
  EXPECT_EQ(index.error().code, Errc::bad_input);
  EXPECT_EQ(index.error().message, "no GPU has a UUID starting with 'GPU-zz'");
}

TEST(NvmlIndexOfUuidPrefix, AmbiguousPrefixListsTheGpus) {
  const Result<unsigned> index = nvml_index_of_uuid_prefix(test::eight_a100s(), "GPU-8");
  ASSERT_FALSE(index.ok());
  EXPECT_EQ(index.error().code, Errc::bad_input);
  EXPECT_EQ(index.error().message, "'GPU-8' matches 3 GPUs (GPU 0, GPU 4, GPU 6); give more of the UUID");
}

TEST(NvmlIndexOfUuidPrefix, EmptyPrefixIsRejectedNotMatchedToEverything) {
  Snapshot one = test::snapshot_of({"A"});
  const Result<unsigned> index = nvml_index_of_uuid_prefix(one, "  ");
  ASSERT_FALSE(index.ok());
  EXPECT_EQ(index.error().code, Errc::bad_input);
}

TEST(NvmlIndexOfUuidPrefix, PrefixMustStartAtTheBeginning) {
  // "8f2c" is how GPU 0's UUID continues after "GPU-", but only the whole spelling matches.
  const Result<unsigned> index = nvml_index_of_uuid_prefix(test::eight_a100s(), "8f2c");
  EXPECT_FALSE(index.ok());
}

TEST(NvmlIndexOfUuidPrefix, GpuWithoutUuidNeverMatches) {
  Snapshot snapshot = test::snapshot_of({"A", "A"});
  snapshot.gpus[1].uuid.clear();
  const Result<unsigned> index = nvml_index_of_uuid_prefix(snapshot, "GPU-");
  ASSERT_TRUE(index.ok());
  EXPECT_EQ(*index, 0u);
}

TEST(NvmlIndexOfUuidPrefix, ReturnsNvmlIndexNotPosition) {
  Snapshot snapshot = test::snapshot_of({"A", "A"});
  snapshot.gpus[0].nvml_index = 4;  // a snapshot that skipped GPUs still reports NVML's numbers
  snapshot.gpus[1].nvml_index = 6;
  const Result<unsigned> index = nvml_index_of_uuid_prefix(snapshot, "GPU-1a");
  ASSERT_TRUE(index.ok());
  EXPECT_EQ(*index, 6u);
}


// restrict_to_device: the one narrowing behind `pick/run --device`, `gpuslot device` and the library.
Visibility visible_3_1() { return resolve_visibility(test::eight_a100s(), VisibilityEnv{"3,1", std::nullopt}); }

TEST(RestrictToDevice, EmptyAutoAndCudaLeaveVisibilityAsItIs) {
  for (const char* spec : {"", "auto", "cuda"}) {
    const Result<Visibility> narrowed = restrict_to_device(spec, test::eight_a100s(), visible_3_1());
    ASSERT_TRUE(narrowed.ok()) << spec;
    EXPECT_EQ(narrowed->visible, (std::vector<unsigned>{3, 1})) << spec;
    EXPECT_EQ(narrowed->restricted_by, "CUDA_VISIBLE_DEVICES") << spec;
  }
}

TEST(RestrictToDevice, OrdinalIsInsideTheCurrentVisibilityAndNamesTheSetting) {
  const Result<Visibility> library = restrict_to_device("cuda:1", test::eight_a100s(), visible_3_1());
  ASSERT_TRUE(library.ok());
  EXPECT_EQ(library->visible, std::vector<unsigned>{1});
  EXPECT_EQ(library->restricted_by, "device cuda:1");
  const Result<Visibility> command = restrict_to_device("cuda:1", test::eight_a100s(), visible_3_1(), "--device");
  ASSERT_TRUE(command.ok());
  EXPECT_EQ(command->restricted_by, "--device cuda:1");
  EXPECT_EQ(command->why_not_candidate(3), "outside --device cuda:1");
}

TEST(RestrictToDevice, UuidOfAVisibleGpu) {
  const Result<Visibility> narrowed = restrict_to_device("GPU-3c", test::eight_a100s(), visible_3_1());
  ASSERT_TRUE(narrowed.ok());
  EXPECT_EQ(narrowed->visible, std::vector<unsigned>{3});
  EXPECT_EQ(narrowed->cuda_ordinal_of(3), 0u);
}

TEST(RestrictToDevice, RefusalsSayWhatWasWrong) {
  const Snapshot snapshot = test::eight_a100s();
  const Result<Visibility> missing = restrict_to_device("cuda:2", snapshot, visible_3_1());
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.error().code, Errc::bad_input);
  EXPECT_EQ(missing.error().message, "device cuda:2 does not exist: 2 GPUs are visible (cuda:0 to cuda:1)");
  const Result<Visibility> hidden = restrict_to_device("GPU-2b", snapshot, visible_3_1());
  ASSERT_FALSE(hidden.ok());
  EXPECT_EQ(hidden.error().message, "device GPU-2b is GPU 2, which CUDA_VISIBLE_DEVICES hides from this process");
  const Result<Visibility> cpu = restrict_to_device("cpu", snapshot, visible_3_1(), "--device");
  ASSERT_FALSE(cpu.ok());
  EXPECT_EQ(cpu.error().message, "--device cpu asks for no GPU; expected auto, cuda, cuda:N or GPU-<uuid>");
  const Result<Visibility> invalid = restrict_to_device("gpu", snapshot, visible_3_1());
  ASSERT_FALSE(invalid.ok());
  EXPECT_EQ(invalid.error().code, Errc::bad_input);
}

}  // namespace
}  // namespace gpuslot
