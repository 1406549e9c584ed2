// take_snapshot over the fake NVML: unknown readings stay unknown, a lost GPU stays listed.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>

#include "gpuslot/inventory.hpp"
#include "gpuslot/nvml.hpp"
#include "gpuslot/units.hpp"

namespace gpuslot {
namespace {

Snapshot snapshot_of(const char* host) {
  setenv("GPUSLOT_FAKE_NVML_HOST", host, 1);
  auto library = NvmlLibrary::open(GPUSLOT_FAKE_NVML_PATH);
  EXPECT_TRUE(library.ok());
  auto snapshot = take_snapshot(**library);
  EXPECT_TRUE(snapshot.ok());
  return *snapshot;
}

TEST(TakeSnapshot, LostGpuStaysListedAsUnhealthy) {
  const Snapshot snapshot = snapshot_of(GPUSLOT_TEST_HOSTS_DIR "/lost.json");
  ASSERT_EQ(snapshot.gpus.size(), 4u);
  EXPECT_FALSE(snapshot.gpus[2].healthy);
  EXPECT_NE(snapshot.gpus[2].health_error.find("GPU is lost"), std::string::npos);
  EXPECT_FALSE(snapshot.gpus[2].memory_free_bytes.has_value());
  EXPECT_TRUE(snapshot.gpus[1].healthy);
  EXPECT_EQ(snapshot.gpus[3].nvml_index, 3u);
}

TEST(TakeSnapshot, MissingSensorsAreNulloptNotZero) {
  const Snapshot snapshot = snapshot_of(GPUSLOT_TEST_HOSTS_DIR "/no_utilization.json");
  bool found_unmeasured = false;
  for (const auto& gpu : snapshot.gpus) {
    EXPECT_TRUE(gpu.healthy) << "a missing sensor is not a health problem";
    if (!gpu.utilization_gpu_percent) {
      found_unmeasured = true;
      EXPECT_FALSE(gpu.temperature_c.has_value());
      EXPECT_FALSE(gpu.power_mw.has_value());
    }
  }
  EXPECT_TRUE(found_unmeasured);
}

TEST(TakeSnapshot, ProcessesFromAnotherNamespaceAreKeptAsUnknown) {
  const Snapshot snapshot = snapshot_of(GPUSLOT_SOURCE_EXAMPLE_HOST);
  ASSERT_EQ(snapshot.gpus.size(), 8u);
  ASSERT_EQ(snapshot.gpus[0].processes.size(), 3u);  // pids that do not exist here
  for (const auto& process : snapshot.gpus[0].processes) {
    EXPECT_TRUE(process.used_bytes.has_value());
    EXPECT_FALSE(process.user.has_value());
    EXPECT_FALSE(process.command.has_value());
  }
  EXPECT_EQ(snapshot.gpus[0].memory_used_bytes.value_or(0) / kMiB, 21739u);
}

TEST(IdentifyProcess, ReadsUserAndCommandOfAVisiblePid) {
  const ProcessIdentity identity = identify_process(::getpid());
  ASSERT_TRUE(identity.user.has_value());
  ASSERT_TRUE(identity.command.has_value());
  EXPECT_NE(identity.command->find("unit_inventory"), std::string::npos);
  EXPECT_FALSE(identify_process(0).user.has_value());
}

}  // namespace
}  // namespace gpuslot
