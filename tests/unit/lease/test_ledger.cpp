// The ledger against hand-made snapshots in a private state directory.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "gpuslot/lease.hpp"
#include "gpuslot/units.hpp"

namespace gpuslot {
namespace {

Snapshot one_gpu(std::uint64_t used_by_me = 0) {
  Snapshot snapshot;
  GpuInfo gpu;
  gpu.nvml_index = 0;
  gpu.uuid = "GPU-11111111-2222-3333-4444-555555555555";
  gpu.memory_total_bytes = 24 * kGiB;
  gpu.memory_used_bytes = used_by_me;
  gpu.memory_free_bytes = 24 * kGiB - used_by_me;
  if (used_by_me > 0) gpu.processes.push_back(GpuProcess{::getpid(), used_by_me, std::nullopt, std::nullopt});
  snapshot.gpus.push_back(gpu);
  return snapshot;
}

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

  Result<Reservation> reserve(Ledger& ledger, std::uint64_t bytes, const Snapshot& snapshot) {
    ReserveRequest request;
    request.requirements.memory_bytes = bytes;
    request.command = "unit test";
    return ledger.reserve(
        request, [&] { return Result<Snapshot>(snapshot); },
        [](const Snapshot& s) {
          Visibility visibility;
          for (const auto& gpu : s.gpus) visibility.visible.push_back(gpu.nvml_index);
          return visibility;
        });
  }

  std::filesystem::path directory_;
};

TEST_F(LedgerTest, StateDirectoryIsCreatedStickyWorldWritable) {
  struct stat info {};
  ASSERT_EQ(::stat(directory_.c_str(), &info), 0);
  EXPECT_EQ(info.st_mode & 07777, 01777u);
}

TEST_F(LedgerTest, ReservationsCountUntilTheRoomIsGone) {
  Ledger ledger(directory_.string());
  const Snapshot snapshot = one_gpu();
  auto first = reserve(ledger, 10 * kGiB, snapshot);
  auto second = reserve(ledger, 10 * kGiB, snapshot);
  auto third = reserve(ledger, 10 * kGiB, snapshot);
  ASSERT_TRUE(first.ok() && second.ok() && third.ok());
  EXPECT_TRUE(first->lease && second->lease);
  EXPECT_FALSE(third->lease) << "24 GiB cannot hold three 10 GiB reservations";
  EXPECT_NE(third->decision.verdicts[0].reason.find("20.00 GiB reserved"), std::string::npos) << third->decision.verdicts[0].reason;
  EXPECT_EQ(ledger.live_leases().size(), 2u);

  first->lease->release();
  EXPECT_EQ(ledger.live_leases().size(), 1u);
  auto fourth = reserve(ledger, 10 * kGiB, snapshot);
  ASSERT_TRUE(fourth.ok());
  EXPECT_TRUE(fourth->lease) << "a released reservation frees its room at once";
}

TEST_F(LedgerTest, MemoryOfTheHoldersTreeIsNotCountedTwice) {
  Ledger ledger(directory_.string());
  auto held = reserve(ledger, 10 * kGiB, one_gpu());
  ASSERT_TRUE(held.ok() && held->lease);
  std::vector<LeaseRecord> leases = ledger.live_leases();
  // This process (the holder) now shows 6 GiB in NVML: only 4 GiB are still outstanding.
  const OutstandingReservations outstanding = Ledger::outstanding(leases, one_gpu(6 * kGiB));
  EXPECT_EQ(outstanding.at(0), 4 * kGiB);
  EXPECT_EQ(leases.front().in_use_bytes, 6 * kGiB);
  const OutstandingReservations loaded = Ledger::outstanding(leases, one_gpu(12 * kGiB));
  EXPECT_EQ(loaded.count(0), 0u) << "a model above its reservation leaves nothing outstanding";
}

TEST_F(LedgerTest, CorruptLeaseFileIsIgnoredWithAWarning) {
  std::ofstream(directory_ / "lease-bogus.json") << "{\"format\": 1, \"id\": ";
  ::chmod((directory_ / "lease-bogus.json").c_str(), 0644);
  Ledger ledger(directory_.string());
  std::vector<std::string> warnings;
  EXPECT_TRUE(ledger.live_leases(&warnings).empty());
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_NE(warnings[0].find("lease-bogus.json"), std::string::npos);
  auto reserved = reserve(ledger, 10 * kGiB, one_gpu());
  ASSERT_TRUE(reserved.ok());
  EXPECT_TRUE(reserved->lease);
}

TEST_F(LedgerTest, UnlockedLeaseOfALivePidIsDeadNotRevived) {
  // A well-formed lease naming this very (live) process, but nobody holds its lock: the holder
  // that wrote it is gone, whatever process now has that pid.
  std::ofstream(directory_ / "lease-stale.json")
      << "{\"format\":1,\"id\":\"stale\",\"holder_pid\":" << ::getpid()
      << ",\"holder_start_ticks\":1,\"uid\":" << ::geteuid()
      << ",\"user\":\"x\",\"gpu_uuids\":[\"GPU-11111111-2222-3333-4444-555555555555\"],\"nvml_indices\":[0],"
         "\"reserved_bytes\":25769803776,\"command\":\"gone\",\"taken_at_ms\":1,\"expires_at_ms\":null}\n";
  ::chmod((directory_ / "lease-stale.json").c_str(), 0644);
  Ledger ledger(directory_.string());
  EXPECT_TRUE(ledger.live_leases().empty());
  EXPECT_FALSE(std::filesystem::exists(directory_ / "lease-stale.json")) << "the dead lease is cleaned up";
}

TEST_F(LedgerTest, ReleaseOfUnknownIdIsBadInput) {
  Ledger ledger(directory_.string());
  auto released = ledger.release("nope");
  ASSERT_FALSE(released.ok());
  EXPECT_EQ(released.error().code, Errc::bad_input);
  EXPECT_EQ(ledger.release("../etc/passwd").error().code, Errc::bad_input);
}

TEST_F(LedgerTest, WorldWritableDirectoryWithoutStickyBitIsRefused) {
  const auto unsafe = directory_ / "unsafe";
  std::filesystem::create_directory(unsafe);
  ::chmod(unsafe.c_str(), 0777);
  auto opened = open_state_directory(unsafe.string());
  ASSERT_FALSE(opened.ok());
  EXPECT_EQ(opened.error().code, Errc::state);
  EXPECT_NE(opened.error().message.find("sticky"), std::string::npos);
}

TEST_F(LedgerTest, SymlinkedDirectoryIsRefused) {
  const auto link = directory_ / "link";
  std::filesystem::create_directory_symlink(directory_, link);
  auto opened = open_state_directory(link.string());
  ASSERT_FALSE(opened.ok());
  EXPECT_NE(opened.error().message.find("symlink"), std::string::npos);
}

}  // namespace
}  // namespace gpuslot
