// Shared by the lease unit tests: a private state directory per test and hand-made snapshots.
#pragma once

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>

#include "gpuslot/lease.hpp"
#include "gpuslot/units.hpp"

namespace gpuslot::testing_lease {

inline constexpr const char* kGpu0 = "GPU-11111111-2222-3333-4444-555555555555";

// One 24 GiB GPU; each (pid, bytes) pair is a compute process using that much of it.
inline Snapshot one_gpu_with(std::vector<std::pair<pid_t, std::uint64_t>> processes) {
  Snapshot snapshot;
  GpuInfo gpu;
  gpu.nvml_index = 0;
  gpu.uuid = kGpu0;
  std::uint64_t used = 0;
  for (const auto& [pid, bytes] : processes) {
    used += bytes;
    gpu.processes.push_back(GpuProcess{pid, bytes, std::nullopt, std::nullopt});
  }
  gpu.memory_total_bytes = 24 * kGiB;
  gpu.memory_used_bytes = used;
  gpu.memory_free_bytes = 24 * kGiB - used;
  snapshot.gpus.push_back(gpu);
  return snapshot;
}

// One 24 GiB GPU of which this process uses `used_by_me`.
inline Snapshot one_gpu(std::uint64_t used_by_me = 0) {
  if (used_by_me == 0) return one_gpu_with({});
  return one_gpu_with({{::getpid(), used_by_me}});
}

inline Visibility all_visible(const Snapshot& snapshot) {
  Visibility visibility;
  for (const auto& gpu : snapshot.gpus) visibility.visible.push_back(gpu.nvml_index);
  return visibility;
}

inline ReserveRequest request_of(std::uint64_t bytes) {
  ReserveRequest request;
  request.requirements.memory_bytes = bytes;
  request.command = "unit test";
  return request;
}

// A child that sleeps until killed; killed and reaped when this goes out of scope.
class SleepingChild {
 public:
  SleepingChild() : pid_(::fork()) {
    if (pid_ == 0) {
      for (;;) ::pause();
    }
  }
  ~SleepingChild() { stop(); }
  SleepingChild(const SleepingChild&) = delete;
  SleepingChild& operator=(const SleepingChild&) = delete;
  pid_t pid() const { return pid_; }
  void stop() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    pid_ = -1;
  }

 private:
  pid_t pid_;
};

class LedgerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    directory_ = std::filesystem::temp_directory_path() / ("gpuslot-unit-" + std::to_string(::getpid()) + "-" +
                                                           ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(directory_);
    auto opened = open_state_directory(directory_.string());
    ASSERT_TRUE(opened.ok()) << opened.error().message;
  }
  void TearDown() override { std::filesystem::remove_all(directory_); }

  Result<Reservation> reserve(Ledger& ledger, std::uint64_t bytes, const Snapshot& snapshot,
                              std::vector<std::string>* warnings = nullptr) {
    return reserve(ledger, request_of(bytes), snapshot, warnings);
  }
  Result<Reservation> reserve(Ledger& ledger, const ReserveRequest& request, const Snapshot& snapshot,
                              std::vector<std::string>* warnings = nullptr) {
    return ledger.reserve(request, [&] { return Result<Snapshot>(snapshot); }, all_visible, warnings);
  }

  std::filesystem::path directory_;
};

}  // namespace gpuslot::testing_lease
