// child_gpu_env: the one place a child's GPU environment is built.
#include <gtest/gtest.h>

#include <string>
#include <utility>
#include <vector>

#include "gpuslot/visibility.hpp"
#include "unit/visibility/hand_made_snapshots.hpp"

namespace gpuslot {
namespace {

using Vars = std::vector<std::pair<std::string, std::string>>;

std::string uuid(unsigned index) { return test::eight_uuids().at(index); }

// What a CUDA process started with `env` would see, read back through the same parser.
Visibility as_child_sees(const Snapshot& snapshot, const ChildGpuEnv& env) {
  VisibilityEnv read;
  for (const auto& [name, value] : env.set) {
    if (name == "CUDA_VISIBLE_DEVICES") read.cuda_visible_devices = value;
    if (name == "CUDA_DEVICE_ORDER") read.cuda_device_order = value;
  }
  return resolve_visibility(snapshot, read);
}

TEST(ChildGpuEnv, IndexFormatListsNvmlIndicesWithPciBusOrder) {
  const ChildGpuEnv env = child_gpu_env(test::eight_a100s(), {3, 1}, ExportFormat::index);
  EXPECT_EQ(env.set, (Vars{{"CUDA_VISIBLE_DEVICES", "3,1"},
                           {"CUDA_DEVICE_ORDER", "PCI_BUS_ID"},
                           {"GPUSLOT_GPU_UUIDS", uuid(3) + "," + uuid(1)}}));
}

TEST(ChildGpuEnv, UuidFormatListsUuidsAndStillSetsPciBusOrder) {
  const ChildGpuEnv env = child_gpu_env(test::eight_a100s(), {3, 1}, ExportFormat::uuid);
  EXPECT_EQ(env.set, (Vars{{"CUDA_VISIBLE_DEVICES", uuid(3) + "," + uuid(1)},
                           {"CUDA_DEVICE_ORDER", "PCI_BUS_ID"},
                           {"GPUSLOT_GPU_UUIDS", uuid(3) + "," + uuid(1)}}));
}

TEST(ChildGpuEnv, EmptyListHidesEveryGpu) {
  const ChildGpuEnv env = child_gpu_env(test::eight_a100s(), {}, ExportFormat::index);
  EXPECT_EQ(env.set,
            (Vars{{"CUDA_VISIBLE_DEVICES", ""}, {"CUDA_DEVICE_ORDER", "PCI_BUS_ID"}, {"GPUSLOT_GPU_UUIDS", ""}}));
  EXPECT_TRUE(as_child_sees(test::eight_a100s(), env).visible.empty());
}

TEST(ChildGpuEnv, RepeatedIndexIsListedOnceSoCudaDoesNotHideEverything) {
  const ChildGpuEnv env = child_gpu_env(test::eight_a100s(), {2, 5, 2}, ExportFormat::index);
  EXPECT_EQ(env.set.front(), (std::pair<std::string, std::string>{"CUDA_VISIBLE_DEVICES", "2,5"}));
  EXPECT_EQ(as_child_sees(test::eight_a100s(), env).visible, (std::vector<unsigned>{2, 5}));
}

TEST(ChildGpuEnv, UuidFormatFallsBackToIndicesWhenAUuidIsUnknown) {
  Snapshot snapshot = test::eight_a100s();
  snapshot.gpus[4].uuid.clear();
  const ChildGpuEnv env = child_gpu_env(snapshot, {4, 0}, ExportFormat::uuid);
  EXPECT_EQ(env.set, (Vars{{"CUDA_VISIBLE_DEVICES", "4,0"},
                           {"CUDA_DEVICE_ORDER", "PCI_BUS_ID"},
                           {"GPUSLOT_GPU_UUIDS", "," + uuid(0)}}));
}

TEST(ChildGpuEnv, IndexMissingFromSnapshotKeepsItsNumberAndAnEmptyUuid) {
  const ChildGpuEnv env = child_gpu_env(test::snapshot_of({"A", "A"}), {1, 9}, ExportFormat::uuid);
  EXPECT_EQ(env.set, (Vars{{"CUDA_VISIBLE_DEVICES", "1,9"},
                           {"CUDA_DEVICE_ORDER", "PCI_BUS_ID"},
                           {"GPUSLOT_GPU_UUIDS", uuid(1) + ","}}));
}

TEST(ChildGpuEnv, UsesNvmlIndexFieldNotSnapshotPosition) {
  Snapshot snapshot = test::snapshot_of({"A", "A"});
  snapshot.gpus[0].nvml_index = 1;  // positions and NVML indices disagree on purpose
  snapshot.gpus[1].nvml_index = 0;
  const ChildGpuEnv env = child_gpu_env(snapshot, {0}, ExportFormat::uuid);
  EXPECT_EQ(env.set.front().second, uuid(1));
}

// The child must see exactly the GPUs chosen, in the order chosen, under both formats and on a
// host where CUDA's default numbering differs from nvidia-smi's.
TEST(ChildGpuEnv, ChildSeesExactlyTheChosenGpusOnAMixedHost) {
  const Snapshot host = test::mixed_host();
  for (ExportFormat format : {ExportFormat::index, ExportFormat::uuid}) {
    const Visibility seen = as_child_sees(host, child_gpu_env(host, {3, 0, 2}, format));
    EXPECT_EQ(seen.visible, (std::vector<unsigned>{3, 0, 2}));
    EXPECT_EQ(seen.ambiguity, std::nullopt);
    EXPECT_EQ(seen.note, std::nullopt);
    EXPECT_EQ(seen.cuda_ordinal_of(0), 1u);
  }
}

TEST(ChildEnvironment, ReplacesInheritedVariablesAndTheLastSettingWins) {
  const char* base[] = {"PATH=/bin", "CUDA_VISIBLE_DEVICES=0,1", "HOME=/root", "NOEQUALS", nullptr};
  const auto entries = child_environment(base, {{"CUDA_VISIBLE_DEVICES", "7"},  // e.g. a job's own "env"
                                                {"SEED", "1"},
                                                {"CUDA_VISIBLE_DEVICES", "3"}});  // gpuslot's, listed last
  EXPECT_EQ(entries, (std::vector<std::string>{"PATH=/bin", "HOME=/root", "NOEQUALS", "SEED=1", "CUDA_VISIBLE_DEVICES=3"}));
  EXPECT_EQ(child_environment(nullptr, {{"A", "b"}}), std::vector<std::string>{"A=b"});
}

}  // namespace
}  // namespace gpuslot
