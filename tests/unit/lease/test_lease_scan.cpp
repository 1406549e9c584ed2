// Select-and-reserve in its two looks at the lease files: every file read before the host lock,
// only new or replaced names read under it (lease_scan.cpp, reserve_locked in ledger.cpp). Each
// test changes the directory between the two looks, as a concurrent launch would.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>

#include "lease/internal.hpp"
#include "unit/lease/ledger_fixture.hpp"

namespace gpuslot {
namespace {

using namespace testing_lease;
using namespace lease_internal;

class LeaseScanTest : public LedgerTest {
 protected:
  // The part of Ledger::reserve after view_before_lock: take the lock, decide, publish.
  Result<Reservation> reserve_under_lock(Ledger& ledger, const ReserveRequest& request, const Snapshot& snapshot,
                                         LedgerView& view, std::vector<std::string>* warnings = nullptr) {
    auto lock = HostLock::acquire(ledger.directory());
    if (!lock) return lock.error();
    return reserve_locked(ledger, request, holder_identity(request), snapshot, all_visible, /*take=*/true, view, warnings);
  }
};

TEST_F(LeaseScanTest, LeasePublishedBetweenScanAndLockIsCounted) {
  Ledger ledger(directory_.string());
  const Snapshot snapshot = one_gpu();
  LedgerView view = view_before_lock(ledger.directory(), snapshot, nullptr);
  EXPECT_EQ(view.scan.files_read(), 0u);
  auto other = reserve(ledger, 20 * kGiB, snapshot);  // another launch, between our two looks
  ASSERT_TRUE(other.ok() && other->lease);
  auto mine = reserve_under_lock(ledger, request_of(10 * kGiB), snapshot, view);
  ASSERT_TRUE(mine.ok());
  EXPECT_FALSE(mine->lease) << "the 20 GiB published after the scan must leave no room for 10 GiB";
  EXPECT_NE(mine->decision.verdicts[0].reason.find("20.00 GiB reserved"), std::string::npos) << mine->decision.verdicts[0].reason;
  EXPECT_EQ(view.scan.names_charged(), 1u) << "the new lease was charged from its name under the lock";
  EXPECT_EQ(view.scan.files_read(), 0u) << "without opening its file";
}

TEST_F(LeaseScanTest, NewLeaseWhoseNameIsPlainOrNamesAnotherGpuIsReadUnderTheLock) {
  Ledger ledger(directory_.string());
  const Snapshot snapshot = one_gpu();
  LedgerView view = view_before_lock(ledger.directory(), snapshot, nullptr);
  auto other = reserve(ledger, 20 * kGiB, snapshot);
  ASSERT_TRUE(other.ok() && other->lease);
  // The same lease under a plain name, and under a name whose GPU tag is not GPU 0's (taken
  // before the GPUs were renumbered, say): neither name can be trusted to charge the right GPU.
  const std::string charged = other->lease->record().path;
  const std::string plain = ledger.directory() + "/lease-" + other->lease->record().id + ".json";
  const std::string elsewhere = ledger.directory() + "/lease-" + other->lease->record().id + "x.r1.g0-00000000.json";
  ASSERT_EQ(::link(charged.c_str(), plain.c_str()), 0);
  ASSERT_EQ(::rename(charged.c_str(), elsewhere.c_str()), 0);
  auto mine = reserve_under_lock(ledger, request_of(10 * kGiB), snapshot, view);
  ASSERT_TRUE(mine.ok());
  EXPECT_FALSE(mine->lease) << "20 GiB of the same lease, read from its file";
  EXPECT_EQ(view.scan.names_charged(), 0u);
  EXPECT_EQ(view.scan.files_read(), 2u) << "both names were read";
  ::unlink(plain.c_str());
  ::unlink(elsewhere.c_str());
}

TEST_F(LeaseScanTest, ChargesNamedOutOfRangeSaturateInsteadOfWrapping) {
  // Two names claiming 2^63 bytes each on GPU 0 would wrap a plain sum round to 0, and a third
  // claiming 1 GiB would then leave room: the sum must stay at its largest value instead.
  Ledger ledger(directory_.string());
  const Snapshot snapshot = one_gpu();
  LedgerView view = view_before_lock(ledger.directory(), snapshot, nullptr);
  const std::string tag = uuid_tag(kGpu0);
  for (const char* charge : {"1-a.r9223372036854775808", "1-b.r9223372036854775808", "1-c.r1073741824"}) {
    const std::string path = ledger.directory() + "/lease-" + charge + ".g0-" + tag + ".json";
    std::ofstream(path) << "{}";
    ::chmod(path.c_str(), 0644);
  }
  auto mine = reserve_under_lock(ledger, request_of(1 * kGiB), snapshot, view);
  ASSERT_TRUE(mine.ok());
  EXPECT_EQ(view.scan.names_charged(), 3u);
  EXPECT_EQ(view.scan.charged_by_name().at(0), UINT64_MAX);
  EXPECT_FALSE(mine->lease) << mine->decision.verdicts[0].reason;
}

TEST_F(LeaseScanTest, AStateDirectoryThatCannotBeListedUnderTheLockIsNotDecidedOn) {
  // Out of file descriptors under the lock: the leases cannot be listed, so nothing is decided
  // (before, the look under the lock counted no lease at all).
  Ledger ledger(directory_.string());
  const Snapshot snapshot = one_gpu();
  auto other = reserve(ledger, 20 * kGiB, snapshot);
  ASSERT_TRUE(other.ok() && other->lease);
  const pid_t child = ::fork();
  if (child == 0) {
    LedgerView view = view_before_lock(ledger.directory(), snapshot, nullptr);
    auto lock = HostLock::acquire(ledger.directory());
    if (!lock) ::_exit(2);
    while (::dup(0) >= 0) {
    }
    auto mine = reserve_locked(ledger, request_of(10 * kGiB), holder_identity(request_of(10 * kGiB)), snapshot,
                               all_visible, /*take=*/true, view, nullptr);
    ::_exit(!mine.ok() && mine.error().code == Errc::state ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "1: decided without the leases; 2: no lock";
}

TEST_F(LeaseScanTest, LeaseReleasedBetweenScanAndLockIsDropped) {
  Ledger ledger(directory_.string());
  const Snapshot snapshot = one_gpu();
  auto other = reserve(ledger, 20 * kGiB, snapshot);
  ASSERT_TRUE(other.ok() && other->lease);
  LedgerView view = view_before_lock(ledger.directory(), snapshot, nullptr);
  ASSERT_EQ(view.scan.live().size(), 1u);
  other->lease->release();
  auto mine = reserve_under_lock(ledger, request_of(10 * kGiB), snapshot, view);
  ASSERT_TRUE(mine.ok());
  EXPECT_TRUE(mine->lease) << "a name no longer listed under the lock is not counted";
}

TEST_F(LeaseScanTest, LockedLookReadsNoFileAndNoProcWhenNothingChanged) {
  Ledger ledger(directory_.string());
  // Processes on the GPU that are not this process: their ancestry is walked (and cached).
  const Snapshot empty = one_gpu();
  std::vector<std::unique_ptr<HeldLease>> held;
  for (int i = 0; i < 3; ++i) {
    auto taken = reserve(ledger, 1 * kGiB, empty);
    ASSERT_TRUE(taken.ok() && taken->lease);
    held.push_back(std::move(taken->lease));
  }
  SleepingChild child;
  const Snapshot snapshot = one_gpu_with({{::getppid(), 1 * kGiB}, {child.pid(), 1 * kGiB}});
  LedgerView view = view_before_lock(ledger.directory(), snapshot, nullptr);
  EXPECT_EQ(view.scan.files_read(), 3u);
  const std::size_t proc_reads = view.facts.proc_reads();
  EXPECT_GT(proc_reads, 0u);
  auto mine = reserve_under_lock(ledger, request_of(1 * kGiB), snapshot, view);
  ASSERT_TRUE(mine.ok() && mine->lease);
  EXPECT_EQ(view.scan.files_read(), 3u) << "under the lock: one readdir, no file read";
  EXPECT_EQ(view.facts.proc_reads(), proc_reads) << "under the lock: no /proc read";
  // The child's memory was credited to the leases of its parent (this process) all the same.
  std::vector<LeaseRecord> leases = view.scan.live();
  EXPECT_EQ(charge_leases(leases, snapshot, view.facts).count(0), 0u);
}

TEST_F(LeaseScanTest, FileReplacedBetweenScanAndLockIsReadAgain) {
  Ledger ledger(directory_.string());
  SleepingChild job;
  // The job uses 6 GiB of its 10 GiB lease: 4 GiB outstanding once the lease names it, 10 GiB
  // while it is pending. 24 − 6 used − 4 = 14 GiB left for 12 GiB; 24 − 6 − 10 = 8 is not enough.
  const Snapshot snapshot = one_gpu_with({{job.pid(), 6 * kGiB}});
  ReserveRequest pending = request_of(10 * kGiB);
  pending.holder_pending = true;
  auto scheduled = reserve(ledger, pending, one_gpu());
  ASSERT_TRUE(scheduled.ok() && scheduled->lease);
  LedgerView view = view_before_lock(ledger.directory(), snapshot, nullptr);
  ASSERT_EQ(view.scan.live().at(0).holder_pid, 0);
  ASSERT_TRUE(scheduled->lease->reassign(job.pid()).ok());
  auto mine = reserve_under_lock(ledger, request_of(12 * kGiB), snapshot, view);
  ASSERT_TRUE(mine.ok());
  EXPECT_TRUE(mine->lease) << mine->decision.verdicts[0].reason;
  EXPECT_EQ(view.scan.files_read(), 2u) << "the replaced file (new inode) was read again under the lock";
}

TEST_F(LeaseScanTest, FileReplacedTwiceBetweenScanAndLockIsReadAgain) {
  // The second replacement could take the first file's freed inode number (ext4 reuses them at
  // once) and pass for it, were the scan not holding the first file open.
  Ledger ledger(directory_.string());
  SleepingChild job;
  const Snapshot snapshot = one_gpu_with({{job.pid(), 6 * kGiB}});
  ReserveRequest pending = request_of(10 * kGiB);
  pending.holder_pending = true;
  for (int round = 0; round < 20; ++round) {
    auto scheduled = reserve(ledger, pending, one_gpu());
    ASSERT_TRUE(scheduled.ok() && scheduled->lease);
    LedgerView view = view_before_lock(ledger.directory(), snapshot, nullptr);
    ASSERT_TRUE(scheduled->lease->reassign(::getppid()).ok());
    ASSERT_TRUE(scheduled->lease->reassign(job.pid()).ok());
    auto mine = reserve_under_lock(ledger, request_of(12 * kGiB), snapshot, view);
    ASSERT_TRUE(mine.ok());
    ASSERT_TRUE(mine->lease) << "round " << round << ": " << mine->decision.verdicts[0].reason;
  }
}

TEST_F(LeaseScanTest, LeaseWhoseHolderDiedBetweenScanAndLockStillCounts) {
  // Conservative by design: the lock probe is not repeated under the lock. The next look drops it.
  Ledger ledger(directory_.string());
  const Snapshot snapshot = one_gpu();
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t holder = ::fork();
  if (holder == 0) {
    auto held = reserve(ledger, 20 * kGiB, snapshot);
    const char ok = held.ok() && held->lease ? 'y' : 'n';
    (void)!::write(ready[1], &ok, 1);
    for (;;) ::pause();
  }
  char ok = 0;
  ASSERT_EQ(::read(ready[0], &ok, 1), 1);
  ::close(ready[0]);
  ::close(ready[1]);
  ASSERT_EQ(ok, 'y');
  LedgerView view = view_before_lock(ledger.directory(), snapshot, nullptr);
  ::kill(holder, SIGKILL);
  ::waitpid(holder, nullptr, 0);
  auto counted = reserve_under_lock(ledger, request_of(10 * kGiB), snapshot, view);
  ASSERT_TRUE(counted.ok());
  EXPECT_FALSE(counted->lease);
  auto next = reserve(ledger, 10 * kGiB, snapshot);
  ASSERT_TRUE(next.ok());
  EXPECT_TRUE(next->lease) << "a fresh look finds it dead";
}

TEST_F(LeaseScanTest, CorruptFileWrittenBetweenScanAndLockIsWarnedOnceAndIgnored) {
  Ledger ledger(directory_.string());
  const Snapshot snapshot = one_gpu();
  std::vector<std::string> warnings;
  LedgerView view = view_before_lock(ledger.directory(), snapshot, &warnings);
  EXPECT_TRUE(warnings.empty());
  std::ofstream(directory_ / "lease-late.json") << "{";
  ::chmod((directory_ / "lease-late.json").c_str(), 0644);
  auto mine = reserve_under_lock(ledger, request_of(10 * kGiB), snapshot, view, &warnings);
  ASSERT_TRUE(mine.ok() && mine->lease);
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_NE(warnings[0].find("lease-late.json"), std::string::npos);
}

}  // namespace
}  // namespace gpuslot
