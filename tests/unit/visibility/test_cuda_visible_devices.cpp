// CUDA_VISIBLE_DEVICES / CUDA_DEVICE_ORDER as the driver reads them
// (shared/reference/cuda-visible-devices.md). One row per rule; the row's name says what it guards.
#include <gtest/gtest.h>

#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "gpuslot/visibility.hpp"
#include "unit/visibility/hand_made_snapshots.hpp"

namespace gpuslot {
namespace {

enum class Host { eight_a100s, mixed, none };
enum class Ambiguity { none, integers, unset };

const char* const kAmbiguousIntegers =
    "GPUs of different models and CUDA_DEVICE_ORDER is not PCI_BUS_ID: CUDA numbers them fastest first, so "
    "integer CUDA ordinals cannot be mapped to nvidia-smi indices; set CUDA_DEVICE_ORDER=PCI_BUS_ID or use GPU "
    "UUIDs";
const char* const kAmbiguousUnset =
    "GPUs of different models and CUDA_DEVICE_ORDER is not PCI_BUS_ID: CUDA numbers them fastest first, so CUDA "
    "ordinals cannot be mapped to nvidia-smi indices; set CUDA_DEVICE_ORDER=PCI_BUS_ID or list GPU UUIDs in "
    "CUDA_VISIBLE_DEVICES";
const char* const kLenient =
    " read ignoring surrounding white space and letter case (CUDA's own handling of these is undocumented)";

struct Case {
  const char* name;
  std::optional<std::string> cuda_visible_devices;
  std::vector<unsigned> visible;
  std::optional<std::string> note;
  Host host = Host::eight_a100s;
  std::optional<std::string> cuda_device_order = std::nullopt;
  Ambiguity ambiguity = Ambiguity::none;
};

std::ostream& operator<<(std::ostream& out, const Case& c) { return out << c.name; }

Snapshot host_of(Host host) {
  switch (host) {
    case Host::eight_a100s: return test::eight_a100s();
    case Host::mixed: return test::mixed_host();
    case Host::none: return Snapshot{};
  }
  return Snapshot{};
}

std::string uuid(unsigned index) { return test::eight_uuids().at(index); }

const Case kCases[] = {
    // Unset and empty.
    {"unset_sees_every_gpu_in_pci_order", std::nullopt, {0, 1, 2, 3, 4, 5, 6, 7}, std::nullopt},
    {"empty_string_hides_every_gpu", "", {}, "CUDA_VISIBLE_DEVICES is set but empty: CUDA sees no GPU"},
    {"white_space_only_is_an_empty_entry", " ", {},
     "CUDA_VISIBLE_DEVICES stops at invalid entry '' (empty entry): CUDA sees no GPU"},
    {"no_gpus_unset_is_empty", std::nullopt, {}, std::nullopt, Host::none},
    {"no_gpus_index_is_out_of_range", "0", {},
     "CUDA_VISIBLE_DEVICES stops at invalid entry '0' (this host has no GPU): CUDA sees no GPU", Host::none},

    // Integer lists: order, strtoul reading.
    {"single_index", "3", {3}, std::nullopt},
    {"list_order_is_cuda_ordinal_order", "2,1", {2, 1}, std::nullopt},
    {"every_gpu_listed_backwards", "7,6,5,4,3,2,1,0", {7, 6, 5, 4, 3, 2, 1, 0}, std::nullopt},
    {"leading_white_space_skipped_like_strtoul", " 1,\t2,\n3", {1, 2, 3}, std::nullopt},
    {"trailing_white_space_not_worth_a_note", "1 ,2 ", {1, 2}, std::nullopt},
    {"plus_sign_accepted_like_strtoul", "+1", {1}, std::nullopt},
    {"minus_zero_is_device_zero", "-0", {0}, std::nullopt},
    {"leading_zeros_are_decimal", "007", {7}, std::nullopt},
    {"text_after_digits_ignored_like_strtoul", "1gpu2,2ampere", {1, 2},
     "entry '1gpu2' read as 1 (CUDA ignores what follows the digits); entry '2ampere' read as 2 (CUDA ignores "
     "what follows the digits)"},
    {"range_syntax_is_not_a_range", "0-2", {0}, "entry '0-2' read as 0 (CUDA ignores what follows the digits)"},
    {"hex_is_read_as_decimal_zero", "0x3", {0}, "entry '0x3' read as 0 (CUDA ignores what follows the digits)"},

    // Integer lists: where parsing stops.
    {"stops_at_index_past_device_count", "0,9,1", {0},
     "CUDA_VISIBLE_DEVICES stops at invalid entry '9' (only 8 GPUs)"},
    {"index_equal_to_device_count_is_invalid", "8", {},
     "CUDA_VISIBLE_DEVICES stops at invalid entry '8' (only 8 GPUs): CUDA sees no GPU"},
    {"huge_index_is_out_of_range_not_wrapped", "1,99999999999999999999999", {1},
     "CUDA_VISIBLE_DEVICES stops at invalid entry '99999999999999999999999' (only 8 GPUs)"},
    {"minus_one_first_hides_every_gpu", "-1", {},
     "CUDA_VISIBLE_DEVICES stops at invalid entry '-1' (negative): CUDA sees no GPU"},
    {"minus_one_later_keeps_entries_before", "0,1,-1,2", {0, 1},
     "CUDA_VISIBLE_DEVICES stops at invalid entry '-1' (negative)"},
    {"negative_with_white_space", "2, -3", {2}, "CUDA_VISIBLE_DEVICES stops at invalid entry '-3' (negative)"},
    {"token_without_digit_stops", "1,a,2", {1}, "CUDA_VISIBLE_DEVICES stops at invalid entry 'a' (not a number)"},
    {"double_sign_is_not_a_number", "+-1", {},
     "CUDA_VISIBLE_DEVICES stops at invalid entry '+-1' (not a number): CUDA sees no GPU"},
    {"empty_entry_stops", "1,,2", {1}, "CUDA_VISIBLE_DEVICES stops at invalid entry '' (empty entry)"},
    {"trailing_comma_keeps_the_list", "1,2,", {1, 2}, "CUDA_VISIBLE_DEVICES stops at invalid entry '' (empty entry)"},
    {"uuid_after_integers_stops", "0,GPU-1a", {0},
     "CUDA_VISIBLE_DEVICES stops at invalid entry 'GPU-1a' (integers and UUIDs cannot be mixed)"},
    {"out_of_range_reported_before_later_syntax_error", "1,9,x", {1},
     "CUDA_VISIBLE_DEVICES stops at invalid entry '9' (only 8 GPUs)"},

    // Integer lists: a device named twice empties everything.
    {"duplicate_index_hides_every_gpu", "0,1,2,1", {}, "CUDA_VISIBLE_DEVICES names device 1 twice: CUDA sees no GPU"},
    {"duplicate_spelled_differently_hides_every_gpu", "1, +01", {},
     "CUDA_VISIBLE_DEVICES names device 1 twice: CUDA sees no GPU"},
    {"minus_zero_duplicates_zero", "0,-0", {}, "CUDA_VISIBLE_DEVICES names device 0 twice: CUDA sees no GPU"},
    {"duplicate_after_out_of_range_still_hides_every_gpu", "0,9,1,1", {},
     "CUDA_VISIBLE_DEVICES names device 1 twice: CUDA sees no GPU"},
    {"duplicate_after_negative_is_never_read", "0,-1,0", {0},
     "CUDA_VISIBLE_DEVICES stops at invalid entry '-1' (negative)"},

    // Scheduler and MIG values.
    {"nodevfiles_hides_every_gpu", "NoDevFiles", {},
     "CUDA_VISIBLE_DEVICES=NoDevFiles: the scheduler gave this job no GPU; CUDA sees no GPU"},
    {"mig_uuid_hides_every_gpu", "MIG-4a1b2c3d-1111-5222-8333-444444444444", {},
     "CUDA_VISIBLE_DEVICES names MIG devices: MIG devices are not scheduled by gpuslot, so no whole GPU is "
     "visible"},
    {"old_style_mig_hides_every_gpu", "MIG-" + uuid(0) + "/1/0", {},
     "CUDA_VISIBLE_DEVICES names MIG devices: MIG devices are not scheduled by gpuslot, so no whole GPU is "
     "visible"},

    // UUID lists.
    {"full_uuid_selects_that_gpu", uuid(3), {3}, std::nullopt},
    {"uuid_list_order_is_cuda_ordinal_order", uuid(7) + "," + uuid(2), {7, 2}, std::nullopt},
    {"unique_uuid_prefix_selects_that_gpu", "GPU-1a", {1}, std::nullopt},
    {"bare_gpu_prefix_matches_every_gpu_so_is_ambiguous", "GPU-", {},
     "CUDA_VISIBLE_DEVICES stops at invalid entry 'GPU-' (matches 8 GPUs): CUDA sees no GPU"},
    {"ambiguous_uuid_prefix_stops", "GPU-1a,GPU-8", {1},
     "CUDA_VISIBLE_DEVICES stops at invalid entry 'GPU-8' (matches 3 GPUs)"},
    {"unknown_uuid_stops", "GPU-1a,GPU-zz,GPU-2b", {1},
     "CUDA_VISIBLE_DEVICES stops at invalid entry 'GPU-zz' (no GPU has that UUID)"},
    {"uuid_middle_part_is_not_a_prefix", "GPU-0b2c3d", {},
     "CUDA_VISIBLE_DEVICES stops at invalid entry 'GPU-0b2c3d' (no GPU has that UUID): CUDA sees no GPU"},
    {"integer_after_uuids_stops", "GPU-1a,2", {1},
     "CUDA_VISIBLE_DEVICES stops at invalid entry '2' (integers and UUIDs cannot be mixed)"},
    {"mig_after_gpu_uuids_stops", "GPU-1a,MIG-4a1b", {1},
     "CUDA_VISIBLE_DEVICES stops at invalid entry 'MIG-4a1b' (GPU and MIG UUIDs cannot be mixed)"},
    {"empty_entry_in_uuid_list_stops", "GPU-1a,,GPU-2b", {1},
     "CUDA_VISIBLE_DEVICES stops at invalid entry '' (empty entry)"},
    {"word_in_uuid_list_stops", "GPU-1a,banana", {1},
     "CUDA_VISIBLE_DEVICES stops at invalid entry 'banana' (not a GPU UUID)"},
    {"duplicate_uuid_text_hides_every_gpu", "GPU-1a,GPU-2b,GPU-1a", {},
     "CUDA_VISIBLE_DEVICES names 'GPU-1a' twice: CUDA sees no GPU"},
    {"duplicate_uuid_text_after_unknown_still_hides_every_gpu", "GPU-1a,GPU-zz,GPU-1a", {},
     "CUDA_VISIBLE_DEVICES names 'GPU-1a' twice: CUDA sees no GPU"},
    {"two_prefixes_of_one_gpu_hide_every_gpu", "GPU-1a,GPU-2b,GPU-1a0b", {},
     "CUDA_VISIBLE_DEVICES names GPU 1 twice ('GPU-1a' and 'GPU-1a0b'): CUDA sees no GPU"},
    {"prefix_repeat_after_unknown_is_never_read", "GPU-1a,GPU-zz,GPU-1a0b", {1},
     "CUDA_VISIBLE_DEVICES stops at invalid entry 'GPU-zz' (no GPU has that UUID)"},

    // gpuslot's choices for UUID spelling: white space dropped, case ignored, and said so.
    {"uuid_match_ignores_case", "gpu-1A0B", {1}, std::string("entry 'gpu-1A0B'") + kLenient},
    {"uuid_match_ignores_surrounding_white_space", " GPU-1a , GPU-2b", {1, 2},
     std::string("entry ' GPU-1a '") + kLenient},
    {"uuid_case_folding_detects_duplicates", "GPU-1a,GPU-1A", {},
     "CUDA_VISIBLE_DEVICES names 'GPU-1A' twice: CUDA sees no GPU"},

    // Numbering on a host with different models.
    {"mixed_models_integer_list_is_ambiguous_without_pci_bus_id", "1,0", {1, 0}, std::nullopt, Host::mixed,
     std::nullopt, Ambiguity::integers},
    {"mixed_models_fastest_first_is_ambiguous", "1,0", {1, 0}, std::nullopt, Host::mixed, "FASTEST_FIRST",
     Ambiguity::integers},
    {"mixed_models_pci_bus_id_is_exact", "1,0", {1, 0}, std::nullopt, Host::mixed, "PCI_BUS_ID"},
    {"mixed_models_unset_ordinals_are_ambiguous", std::nullopt, {0, 1, 2, 3}, std::nullopt, Host::mixed,
     std::nullopt, Ambiguity::unset},
    {"mixed_models_unset_with_pci_bus_id_is_exact", std::nullopt, {0, 1, 2, 3}, std::nullopt, Host::mixed,
     "PCI_BUS_ID"},
    {"mixed_models_uuid_list_is_exact", "GPU-3c,GPU-1a", {3, 1}, std::nullopt, Host::mixed},
    {"mixed_models_nothing_visible_is_not_ambiguous", "-1", {},
     "CUDA_VISIBLE_DEVICES stops at invalid entry '-1' (negative): CUDA sees no GPU", Host::mixed},
    {"mixed_models_out_of_range_first_is_not_ambiguous", "4", {},
     "CUDA_VISIBLE_DEVICES stops at invalid entry '4' (only 4 GPUs): CUDA sees no GPU", Host::mixed},
    {"device_order_is_compared_exactly", "1", {1},
     "CUDA_DEVICE_ORDER='pci_bus_id' is neither PCI_BUS_ID nor FASTEST_FIRST; read as FASTEST_FIRST, CUDA's "
     "default",
     Host::mixed, "pci_bus_id", Ambiguity::integers},
    {"same_models_need_no_device_order", "1,0", {1, 0}, std::nullopt, Host::eight_a100s, "FASTEST_FIRST"},
};

class CudaVisibleDevicesRule : public testing::TestWithParam<Case> {};

TEST_P(CudaVisibleDevicesRule, ResolvesAsCudaDoes) {
  const Case& c = GetParam();
  const Visibility v = resolve_visibility(host_of(c.host), VisibilityEnv{c.cuda_visible_devices, c.cuda_device_order});
  EXPECT_EQ(v.visible, c.visible);
  EXPECT_EQ(v.restricted, c.cuda_visible_devices.has_value());
  EXPECT_EQ(v.note, c.note);
  switch (c.ambiguity) {
    case Ambiguity::none: EXPECT_EQ(v.ambiguity, std::nullopt); break;
    case Ambiguity::integers: EXPECT_EQ(v.ambiguity, std::optional<std::string>(kAmbiguousIntegers)); break;
    case Ambiguity::unset: EXPECT_EQ(v.ambiguity, std::optional<std::string>(kAmbiguousUnset)); break;
  }
}

INSTANTIATE_TEST_SUITE_P(Rules, CudaVisibleDevicesRule, testing::ValuesIn(kCases),
                         [](const testing::TestParamInfo<Case>& row) { return std::string(row.param.name); });

TEST(CudaVisibleDevices, PhysicalGpuThreeIsCudaOneInsideTwoThree) {
  const Visibility v = resolve_visibility(test::eight_a100s(), VisibilityEnv{"2,3", std::nullopt});
  EXPECT_EQ(v.cuda_ordinal_of(2), 0u);
  EXPECT_EQ(v.cuda_ordinal_of(3), 1u);
  EXPECT_EQ(v.cuda_ordinal_of(0), std::nullopt);
  EXPECT_TRUE(v.is_visible(3));
  EXPECT_FALSE(v.is_visible(0));
  EXPECT_FALSE(v.is_visible(8));
}

TEST(CudaVisibleDevices, UnsetIsNotRestricted) {
  const Visibility v = resolve_visibility(test::eight_a100s(), VisibilityEnv{});
  EXPECT_FALSE(v.restricted);
  for (unsigned i = 0; i < 8; ++i) EXPECT_EQ(v.cuda_ordinal_of(i), i);
}

TEST(CudaVisibleDevices, LostGpuStillCountsInDeviceCount) {
  Snapshot snapshot = test::eight_a100s();
  snapshot.gpus[7].healthy = false;
  snapshot.gpus[7].name.clear();  // NVML could not read it
  snapshot.gpus[7].health_error = "GPU is lost";
  const Visibility v = resolve_visibility(snapshot, VisibilityEnv{"7,6", std::nullopt});
  EXPECT_EQ(v.visible, (std::vector<unsigned>{7, 6}));
  EXPECT_EQ(v.note, std::nullopt);
}

TEST(CudaVisibleDevices, UnknownModelNameDoesNotMakeHostAmbiguous) {
  Snapshot snapshot = test::eight_a100s();
  snapshot.gpus[2].name.clear();
  const Visibility v = resolve_visibility(snapshot, VisibilityEnv{"2", std::nullopt});
  EXPECT_EQ(v.visible, (std::vector<unsigned>{2}));
  EXPECT_EQ(v.ambiguity, std::nullopt);
}

TEST(CudaVisibleDevices, GpuWithoutUuidMatchesNoPrefix) {
  Snapshot snapshot = test::snapshot_of({"A", "A"});
  snapshot.gpus[0].uuid.clear();
  // "GPU-" would match both GPUs if the empty UUID took part; it selects GPU 1 alone.
  const Visibility v = resolve_visibility(snapshot, VisibilityEnv{"GPU-", std::nullopt});
  EXPECT_EQ(v.visible, (std::vector<unsigned>{1}));
}

TEST(CudaVisibleDevices, NoteStaysOneLineForControlCharacters) {
  const Visibility v = resolve_visibility(test::eight_a100s(), VisibilityEnv{"0,\n\x01zz", std::nullopt});
  EXPECT_EQ(v.visible, (std::vector<unsigned>{0}));
  ASSERT_TRUE(v.note.has_value());
  EXPECT_EQ(v.note->find('\n'), std::string::npos);
  EXPECT_EQ(*v.note, "CUDA_VISIBLE_DEVICES stops at invalid entry '\\x01zz' (not a number)");
}

TEST(CudaVisibleDevices, NoteCutsVeryLongEntries) {
  const std::string junk(10000, 'x');
  const Visibility v = resolve_visibility(test::eight_a100s(), VisibilityEnv{"1," + junk, std::nullopt});
  ASSERT_TRUE(v.note.has_value());
  EXPECT_LT(v.note->size(), 200u);
}

TEST(CudaVisibleDevices, NodevfilesIgnoresCase) {
  const Visibility v = resolve_visibility(test::eight_a100s(), VisibilityEnv{"nodevfiles", std::nullopt});
  EXPECT_TRUE(v.visible.empty());
  EXPECT_NE(v.note.value_or("").find("NoDevFiles"), std::string::npos);
}

// Restores one environment variable when the test ends, so tests do not leak into each other.
class ScopedEnv {
 public:
  explicit ScopedEnv(const char* name) : name_(name) {
    if (const char* value = std::getenv(name)) saved_ = value;
  }
  ~ScopedEnv() {
    if (saved_) setenv(name_, saved_->c_str(), 1);
    else unsetenv(name_);
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  std::optional<std::string> saved_;
};

TEST(VisibilityEnvFromProcess, UnsetAndEmptyAreDifferent) {
  ScopedEnv keep_cvd("CUDA_VISIBLE_DEVICES");
  ScopedEnv keep_order("CUDA_DEVICE_ORDER");
  unsetenv("CUDA_VISIBLE_DEVICES");
  unsetenv("CUDA_DEVICE_ORDER");
  VisibilityEnv env = visibility_env_from_process();
  EXPECT_EQ(env.cuda_visible_devices, std::nullopt);
  EXPECT_EQ(env.cuda_device_order, std::nullopt);

  setenv("CUDA_VISIBLE_DEVICES", "", 1);
  setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID", 1);
  env = visibility_env_from_process();
  EXPECT_EQ(env.cuda_visible_devices, std::optional<std::string>(""));
  EXPECT_EQ(env.cuda_device_order, std::optional<std::string>("PCI_BUS_ID"));
}

}  // namespace
}  // namespace gpuslot
