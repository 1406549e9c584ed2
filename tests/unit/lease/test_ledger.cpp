// The ledger against hand-made snapshots in a private state directory.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>

#include "gpuslot/lease.hpp"
#include "gpuslot/units.hpp"
#include "lease/internal.hpp"
#include "unit/lease/ledger_fixture.hpp"

namespace gpuslot {
namespace {

using namespace testing_lease;

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

TEST_F(LedgerTest, HolderPidReusedByAnotherProcessIsNotCreditedAndTheWalkGoesOn) {
  // Lease A names this process's pid with another start time (its holder is gone and the pid was
  // reused: this process is someone else); lease B names this process's parent, truly. Memory of
  // this process belongs to B's tree, not A's.
  auto lease = [](std::string id, pid_t holder, unsigned long long ticks) {
    LeaseRecord record;
    record.id = std::move(id);
    record.holder_pid = holder;
    record.holder_start_ticks = ticks;
    record.gpu_uuids = {kGpu0};
    record.reserved_bytes = 10 * kGiB;
    return record;
  };
  const auto my_ticks = process_start_ticks(::getpid());
  const auto parent_ticks = process_start_ticks(::getppid());
  ASSERT_TRUE(my_ticks && parent_ticks);
  std::vector<LeaseRecord> leases = {lease("a", ::getpid(), *my_ticks + 1), lease("b", ::getppid(), *parent_ticks)};
  const OutstandingReservations outstanding = Ledger::outstanding(leases, one_gpu(6 * kGiB));
  EXPECT_EQ(leases[0].in_use_bytes, 0u);
  EXPECT_EQ(leases[1].in_use_bytes, 6 * kGiB);
  EXPECT_EQ(outstanding.at(0), 10 * kGiB + 4 * kGiB);
}

TEST_F(LedgerTest, PendingLeaseCountsInFullEvenWhenItsOwnerShowsMemory) {
  // A scheduler reserves before it spawns the job; its own GPU memory (or another job's it
  // started) must not be credited against the new lease.
  Ledger ledger(directory_.string());
  ReserveRequest request = request_of(10 * kGiB);
  request.holder_pending = true;
  auto held = reserve(ledger, request, one_gpu());
  ASSERT_TRUE(held.ok() && held->lease);
  EXPECT_EQ(held->lease->record().holder_pid, 0);
  EXPECT_EQ(held->lease->record().holder_start_ticks, 0u);
  std::vector<std::string> warnings;
  std::vector<LeaseRecord> leases = ledger.live_leases(&warnings);
  EXPECT_TRUE(warnings.empty()) << warnings.front();
  ASSERT_EQ(leases.size(), 1u) << "a pending lease is a well-formed, live lease";
  EXPECT_EQ(leases.front().holder_pid, 0);
  const OutstandingReservations outstanding = Ledger::outstanding(leases, one_gpu(6 * kGiB));
  EXPECT_EQ(outstanding.at(0), 10 * kGiB);
  EXPECT_EQ(leases.front().in_use_bytes, 0u);
  // The same request without holder_pending is credited with this process's 6 GiB.
  auto plain = reserve(ledger, 1 * kGiB, one_gpu());
  ASSERT_TRUE(plain.ok() && plain->lease);
  std::vector<LeaseRecord> both = ledger.live_leases();
  ASSERT_EQ(both.size(), 2u);
  EXPECT_EQ(Ledger::outstanding(both, one_gpu(6 * kGiB)).at(0), 10 * kGiB) << "1 GiB lease fully used, pending one in full";
}

TEST_F(LedgerTest, PendingLeaseDiesWithItsOwner) {
  Ledger ledger(directory_.string());
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t child = ::fork();
  if (child == 0) {
    ReserveRequest request = request_of(10 * kGiB);
    request.holder_pending = true;
    auto held = reserve(ledger, request, one_gpu());
    const char ok = held.ok() && held->lease ? 'y' : 'n';
    (void)!::write(ready[1], &ok, 1);
    for (;;) ::pause();
  }
  char ok = 0;
  ASSERT_EQ(::read(ready[0], &ok, 1), 1);
  EXPECT_EQ(ok, 'y');
  EXPECT_EQ(ledger.live_leases().size(), 1u);
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  ::close(ready[0]);
  ::close(ready[1]);
  EXPECT_TRUE(ledger.live_leases().empty()) << "the lock, not the (absent) holder pid, keeps a pending lease alive";
}

TEST_F(LedgerTest, AForkedChildsLeaseNamesTheChildNotTheParentItsFactsCameFrom) {
  // The holder's start time is read once per process and thread; a child forked after the
  // parent's first lease reads its own.
  Ledger ledger(directory_.string());
  auto parents = reserve(ledger, 1 * kGiB, one_gpu());
  ASSERT_TRUE(parents.ok() && parents->lease);
  ASSERT_EQ(parents->lease->record().holder_pid, ::getpid());
  ASSERT_EQ(parents->lease->record().holder_start_ticks, process_start_ticks(::getpid()).value_or(0));
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto childs = reserve(ledger, 1 * kGiB, one_gpu());
    const bool right = childs.ok() && childs->lease && childs->lease->record().holder_pid == ::getpid() &&
                       childs->lease->record().holder_start_ticks == process_start_ticks(::getpid()).value_or(0) &&
                       childs->lease->record().user == parents->lease->record().user;
    ::_exit(right ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "the child's lease named the child";
}

// In a pid namespace of its own (root only): P reads its holder facts and forks C; P exits; C forks
// G with P's pid (ns_last_pid). G's lease must name G's start time, not P's, although G's pid is
// the one the inherited copy was read in. Writes '1' (right), '0' (wrong), 's' (G did not get
// pid 2) or 'u' (no namespaces here) to `report`.
[[noreturn]] void pid_reuse_in_a_namespace(int report, const std::string& directory) {
  // A mount namespace too, for a /proc of the new pid namespace (the facts are read from /proc).
  const char unable = 'u';  // no namespaces here (a container's seccomp, say): the test is skipped
  if (::unshare(CLONE_NEWPID | CLONE_NEWNS) != 0 || ::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) {
    (void)::write(report, &unable, 1);
    ::_exit(2);
  }
  const pid_t init = ::fork();  // pid 1 there: reaps whoever is orphaned, until all are gone
  if (init != 0) ::_exit(init > 0 && ::waitpid(init, nullptr, 0) == init ? 0 : 2);
  if (::mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr) != 0) {
    (void)::write(report, &unable, 1);
    ::_exit(2);
  }
  const pid_t p = ::fork();
  if (p == 0) {  // pid 2
    Ledger ledger(directory);  // reads the facts of pid 2
    const pid_t c = ::fork();
    if (c == 0) {  // pid 3; P exits meanwhile
      while (::getppid() != 1) ::usleep(1000);
      ::usleep(30000);  // G starts at least a clock tick after P did
      int last = ::open("/proc/sys/kernel/ns_last_pid", O_WRONLY | O_CLOEXEC);
      if (last < 0 || ::write(last, "1", 1) != 1) ::_exit(3);
      ::close(last);
      const pid_t g = ::fork();
      if (g == 0) {
        ReserveRequest request = request_of(1 * kGiB);
        const LeaseRecord identity = lease_internal::holder_identity(request);
        const bool right = ::getpid() == 2 && identity.holder_pid == 2 &&
                           identity.holder_start_ticks == process_start_ticks(2).value_or(0);
        const char said = ::getpid() != 2 ? 's' : right ? '1' : '0';
        (void)::write(report, &said, 1);
        ::_exit(0);
      }
      ::waitpid(g, nullptr, 0);
      ::_exit(0);
    }
    ::_exit(0);
  }
  while (::wait(nullptr) > 0) {
  }
  ::_exit(0);
}

TEST_F(LedgerTest, AChildWithTheReusedPidOfAnExitedAncestorReadsItsOwnHolderFacts) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root: a pid namespace of its own and its ns_last_pid";
  int pipe_fds[2];
  ASSERT_EQ(::pipe2(pipe_fds, O_CLOEXEC), 0);
  const pid_t runner = ::fork();
  ASSERT_GE(runner, 0);
  if (runner == 0) {
    ::close(pipe_fds[0]);
    pid_reuse_in_a_namespace(pipe_fds[1], directory_.string());
  }
  ::close(pipe_fds[1]);
  pollfd ready{pipe_fds[0], POLLIN, 0};
  char said = 0;
  const bool answered = ::poll(&ready, 1, 10000) == 1 && ::read(pipe_fds[0], &said, 1) == 1;
  ::close(pipe_fds[0]);
  int status = 0;
  ASSERT_EQ(::waitpid(runner, &status, 0), runner);
  ASSERT_TRUE(answered) << "no answer from the namespace (exit status " << status << ")";
  if (said == 'u') GTEST_SKIP() << "this machine refuses a pid and mount namespace of our own";
  ASSERT_NE(said, 's') << "the grandchild did not get the reused pid 2";
  EXPECT_EQ(said, '1') << "the grandchild's lease named its exited ancestor's start time";
}

TEST_F(LedgerTest, CorruptLeaseFileIsIgnoredWithAWarning) {
  std::ofstream(directory_ / "lease-bogus.json") << "{\"format\": 1, \"id\": ";
  ::chmod((directory_ / "lease-bogus.json").c_str(), 0644);
  Ledger ledger(directory_.string());
  std::vector<std::string> warnings;
  EXPECT_TRUE(ledger.live_leases(&warnings).empty());
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_NE(warnings[0].find("lease-bogus.json"), std::string::npos);
  warnings.clear();
  auto reserved = reserve(ledger, 10 * kGiB, one_gpu(), &warnings);
  ASSERT_TRUE(reserved.ok());
  EXPECT_TRUE(reserved->lease);
  EXPECT_EQ(warnings.size(), 1u) << "read before and under the lock, but warned about once";
}

TEST_F(LedgerTest, CorruptLeaseFileIsWarnedOnceWhileWaiting) {
  std::ofstream(directory_ / "lease-bogus.json") << "not json";
  ::chmod((directory_ / "lease-bogus.json").c_str(), 0644);
  Ledger ledger(directory_.string());
  auto big = reserve(ledger, 20 * kGiB, one_gpu());
  ASSERT_TRUE(big.ok() && big->lease);
  std::vector<std::string> warnings;
  int pending_calls = 0;
  const Snapshot snapshot = one_gpu();
  auto waited = ledger.reserve_waiting(
      request_of(10 * kGiB), [&] { return Result<Snapshot>(snapshot); }, all_visible, std::chrono::milliseconds(700),
      [&](const std::string&) { ++pending_calls; }, &warnings);
  ASSERT_FALSE(waited.ok());
  EXPECT_EQ(waited.error().code, Errc::timeout);
  EXPECT_EQ(pending_calls, 1);
  EXPECT_EQ(warnings.size(), 1u) << "several attempts (every 250 ms), one warning";
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

TEST_F(LedgerTest, ReleaseByIdFindsTheFileWhicheverFormItsNameHas) {
  Ledger ledger(directory_.string());
  auto taken = reserve(ledger, 2 * kGiB, one_gpu());
  ASSERT_TRUE(taken.ok() && taken->lease);
  const std::string path = taken->lease->record().path;
  ASSERT_NE(path.find(".r2147483648.g0-"), std::string::npos) << path;
  ASSERT_TRUE(ledger.release(taken->lease->record().id).ok());
  EXPECT_FALSE(std::filesystem::exists(path));
  std::ofstream(directory_ / "lease-9-plain.json") << "{}";
  ASSERT_TRUE(ledger.release("9-plain").ok());
  EXPECT_FALSE(std::filesystem::exists(directory_ / "lease-9-plain.json"));
  EXPECT_EQ(ledger.release("9").error().code, Errc::bad_input) << "an id prefix is not an id";
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
