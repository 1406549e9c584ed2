// Lease files: HeldLease::reassign (a scheduler hands its pending lease to the job it spawned).
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <thread>

#include "unit/lease/ledger_fixture.hpp"

namespace gpuslot {
namespace {

using namespace testing_lease;

class LeaseFileTest : public LedgerTest {
 protected:
  std::unique_ptr<HeldLease> pending_lease(Ledger& ledger, std::uint64_t bytes) {
    ReserveRequest request = request_of(bytes);
    request.holder_pending = true;
    auto taken = reserve(ledger, request, one_gpu());
    if (!taken.ok() || !taken->lease) return nullptr;
    return std::move(taken->lease);
  }
};

TEST_F(LeaseFileTest, ReassignToAChildCreditsTheChildsMemory) {
  Ledger ledger(directory_.string());
  SleepingChild job;
  auto lease = pending_lease(ledger, 10 * kGiB);
  ASSERT_TRUE(lease);
  const std::string id = lease->record().id;
  const std::string path = lease->record().path;
  const Snapshot job_uses_6g = one_gpu_with({{job.pid(), 6 * kGiB}});
  std::vector<LeaseRecord> before = ledger.live_leases();
  EXPECT_EQ(Ledger::outstanding(before, job_uses_6g).at(0), 10 * kGiB) << "pending: nothing credited";

  auto reassigned = lease->reassign(job.pid());
  ASSERT_TRUE(reassigned.ok()) << reassigned.error().message;
  EXPECT_EQ(lease->record().holder_pid, job.pid());
  EXPECT_EQ(lease->record().id, id);
  EXPECT_EQ(lease->record().path, path);
  std::vector<LeaseRecord> after = ledger.live_leases();
  ASSERT_EQ(after.size(), 1u) << "one lease, still live: replaced, not added";
  EXPECT_EQ(after[0].id, id);
  EXPECT_EQ(after[0].holder_pid, job.pid());
  EXPECT_EQ(after[0].holder_start_ticks, process_start_ticks(job.pid()).value());
  EXPECT_EQ(Ledger::outstanding(after, job_uses_6g).at(0), 4 * kGiB);
  EXPECT_EQ(after[0].in_use_bytes, 6 * kGiB);
  EXPECT_FALSE(std::filesystem::exists(directory_ / (".lease-" + id + ".tmp")));

  lease->release();
  EXPECT_TRUE(ledger.live_leases().empty()) << "the reassigned lease is still this process's to release";
}

TEST_F(LeaseFileTest, ReassignedLeaseIsNeverSeenDead) {
  // A reader that opened the old file may probe its lock after the holder has let go of it; it
  // must see that the name moved on, not call the lease dead (and delete the new file).
  Ledger ledger(directory_.string());
  SleepingChild job;
  auto lease = pending_lease(ledger, 1 * kGiB);
  ASSERT_TRUE(lease);
  std::atomic<bool> done{false};
  std::atomic<int> looks{0}, misses{0};
  std::thread reader([&] {
    Ledger reader_ledger(directory_.string());
    while (!done.load()) {
      if (reader_ledger.live_leases().size() != 1) misses.fetch_add(1);
      looks.fetch_add(1);
    }
  });
  int failures = 0;
  for (int i = 0; i < 2000 && (i < 200 || looks.load() < 500); ++i) {
    if (!lease->reassign(i % 2 == 0 ? job.pid() : ::getpid()).ok()) ++failures;
  }
  done.store(true);
  reader.join();
  EXPECT_EQ(failures, 0);
  EXPECT_GT(looks.load(), 0);
  EXPECT_EQ(misses.load(), 0) << "of " << looks.load() << " looks";
  EXPECT_TRUE(std::filesystem::exists(lease->record().path));
  EXPECT_EQ(ledger.live_leases().size(), 1u);
}

TEST_F(LeaseFileTest, FailedReassignLeavesTheOldLease) {
  Ledger ledger(directory_.string());
  SleepingChild job;
  auto lease = pending_lease(ledger, 10 * kGiB);
  ASSERT_TRUE(lease);
  // A directory where the temp file must go makes its creation fail.
  const auto temp = directory_ / (".lease-" + lease->record().id + ".tmp");
  std::filesystem::create_directory(temp);
  auto reassigned = lease->reassign(job.pid());
  ASSERT_FALSE(reassigned.ok());
  EXPECT_EQ(reassigned.error().code, Errc::state);
  EXPECT_EQ(reassigned.error().message.find('\n'), std::string::npos);
  EXPECT_NE(reassigned.error().message.find("still names pid 0"), std::string::npos) << reassigned.error().message;
  EXPECT_EQ(lease->record().holder_pid, 0);
  std::vector<LeaseRecord> leases = ledger.live_leases();
  ASSERT_EQ(leases.size(), 1u);
  EXPECT_EQ(leases[0].holder_pid, 0);
  std::filesystem::remove(temp);
  EXPECT_TRUE(lease->reassign(job.pid()).ok()) << "and it can be retried";
}

TEST_F(LeaseFileTest, ReassignToAMissingProcessOrOfADetachedLeaseIsRefused) {
  Ledger ledger(directory_.string());
  auto lease = pending_lease(ledger, 1 * kGiB);
  ASSERT_TRUE(lease);
  pid_t gone = 0;
  {
    SleepingChild child;
    gone = child.pid();
  }
  auto to_gone = lease->reassign(gone);
  ASSERT_FALSE(to_gone.ok());
  EXPECT_EQ(to_gone.error().code, Errc::state);
  EXPECT_NE(to_gone.error().message.find("no such process"), std::string::npos);
  lease->release();
  auto released = lease->reassign(::getpid());
  ASSERT_FALSE(released.ok());
  EXPECT_EQ(released.error().code, Errc::state);
}

}  // namespace
}  // namespace gpuslot
