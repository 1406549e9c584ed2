// Unit tests of the jobs layer: the jobs file, out-of-memory signatures, the shell fast path,
// the journal's round trip, spare attempt files, and the shepherds.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/prctl.h>
#include <poll.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <thread>

#include "gpuslot/jobs.hpp"
#include "jobs/journal.hpp"
#include "jobs/shepherd.hpp"

namespace gpuslot {
namespace {

using jobs_internal::AttemptFilePool;
using jobs_internal::AttemptFiles;
using jobs_internal::attempt_files;
using jobs_internal::direct_argv;
using jobs_internal::Journal;
using jobs_internal::OpenedAttemptFiles;
using jobs_internal::read_outcome;
using jobs_internal::ShepherdOrder;
using jobs_internal::ShepherdPool;

TEST(JobsFile, PlainLinesTakeTheDefaultsAndLineNames) {
  JobDefaults defaults;
  defaults.memory_bytes = 8ull << 30;
  defaults.gpus = 2;
  auto jobs = parse_jobs("# header\n\npython train.py --lr 0.1\n  echo hi  \n", defaults);
  ASSERT_TRUE(jobs) << jobs.error().message;
  ASSERT_EQ(jobs->size(), 2u);
  EXPECT_EQ((*jobs)[0].name, "job-3");
  EXPECT_EQ((*jobs)[0].shell, "python train.py --lr 0.1");
  EXPECT_EQ((*jobs)[0].memory_bytes, 8ull << 30);
  EXPECT_EQ((*jobs)[0].gpus, 2u);
  EXPECT_EQ((*jobs)[0].oom_retries, 3u);
  EXPECT_EQ((*jobs)[1].shell, "echo hi");
}

TEST(JobsFile, JsonLinesEveryField) {
  auto jobs = parse_jobs(
      R"({"name": "a", "cmd": ["python", "x.py"], "mem": "10G", "gpus": 2, "group": "v", "retries": {"oom": 1, "failure": 2}, "env": {"K": "V"}, "cwd": "/", "exclusive": true}
{"name": "b", "cmd": "echo $K", "after": "a", "mem": 512}
)",
      JobDefaults{});
  ASSERT_TRUE(jobs) << jobs.error().message;
  const JobSpec& a = (*jobs)[0];
  EXPECT_EQ(a.argv, (std::vector<std::string>{"python", "x.py"}));
  EXPECT_EQ(a.memory_bytes, 10ull << 30);
  EXPECT_EQ(a.gpus, 2u);
  EXPECT_EQ(a.group, "v");
  EXPECT_EQ(a.oom_retries, 1u);
  EXPECT_EQ(a.failure_retries, 2u);
  ASSERT_EQ(a.env.size(), 1u);
  EXPECT_EQ(a.env[0].second, "V");
  EXPECT_TRUE(a.exclusive);
  EXPECT_EQ((*jobs)[1].after, std::vector<std::string>{"a"});
  EXPECT_EQ((*jobs)[1].memory_bytes, 512ull << 20);  // a bare number is MiB
  // The journal's canonical form reads back to the same job.
  auto again = job_from_json(job_to_json(a), 1);
  ASSERT_TRUE(again) << again.error().message;
  EXPECT_EQ(job_to_json(*again), job_to_json(a));
}

TEST(JobsFile, RejectsWithTheLine) {
  struct Case {
    const char* text;
    const char* message;
  } cases[] = {
      {"{\"cmd\": \"x\", \"gpu\": 1}\n", "line 1: unknown field 'gpu'"},
      {"{\"cmd\": \"x\"}\n{\"cmd\": \"x\", \"mem\": \"lots\"}\n", "line 2: \"mem\""},
      {"{\"name\": \"a\", \"cmd\": \"x\", \"after\": [\"a\"]}\n", "waits for itself"},
      {"{\"name\": \"a\", \"cmd\": \"x\", \"after\": [\"c\"]}\n{\"name\": \"b\", \"cmd\": \"x\", \"after\": [\"a\"]}\n"
       "{\"name\": \"c\", \"cmd\": \"x\", \"after\": [\"b\"]}\n",
       "cycle: a → c → b → a"},
      {"{\"name\": \"../x\", \"cmd\": \"x\"}\n", "line 1: \"name\" must be"},
      {"{\"cmd\": \"x\", \"cwd\": \"/no/such/dir\"}\n", "is not an existing directory"},
      {"{\"cmd\": \"x\", \"retries\": -1}\n", "\"retries\" must be a whole number"},
      {"{\"name\": \"job-2\", \"cmd\": \"x\"}\n{\"cmd\": \"y\"}\n", "line 2: name 'job-2' is already used by line 1"},
      {"{\"cmd\": [\"echo\", \"a\\u0000b\"]}\n", "line 1: a string holds a NUL character"},
      {"{\"cmd\": \"x\", \"env\": {\"A\": \"\\u0000\"}}\n", "line 1: a string holds a NUL character"},
      {"{\"cmd\": \"x\"}\n{\"cmd\": \"x\", \"cwd\": \"/tmp\\u0000x\"}\n", "line 2: a string holds a NUL character"},
      {"echo ok\necho \xff\n", "line 2: byte 6 is not valid UTF-8"},
      {"echo \xe2\x82\n", "line 1: byte 6 is not valid UTF-8"},
  };
  for (const auto& c : cases) {
    auto jobs = parse_jobs(c.text, JobDefaults{});
    ASSERT_FALSE(jobs) << c.text;
    EXPECT_EQ(jobs.error().code, Errc::bad_input);
    EXPECT_NE(jobs.error().message.find(c.message), std::string::npos) << jobs.error().message;
  }
}

TEST(OutOfMemory, RecognisesTheSignatures) {
  EXPECT_TRUE(looks_like_gpu_oom("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"));
  EXPECT_TRUE(looks_like_gpu_oom("CUDA_ERROR_OUT_OF_MEMORY"));
  EXPECT_TRUE(looks_like_gpu_oom("error: cudaErrorMemoryAllocation"));
  EXPECT_FALSE(looks_like_gpu_oom("MemoryError: host ran out of memory"));
  EXPECT_FALSE(looks_like_gpu_oom(""));
}

TEST(ShellFastPath, OnlyPlainWordsSkipTheShell) {
  EXPECT_EQ(direct_argv("python train.py --lr=0.1 data/x"),
            (std::vector<std::string>{"python", "train.py", "--lr=0.1", "data/x"}));
  EXPECT_EQ(direct_argv("  true  "), std::vector<std::string>{"true"});
  for (const char* line : {"echo hi", "cd /tmp", "A=1 prog", "prog > out", "prog $HOME", "prog 'a b'", "a && b",
                           "prog *.txt", "exit 3", "prog # comment", "~/bin/x", "", "test -f x"}) {
    EXPECT_FALSE(direct_argv(line)) << line;
  }
}

TEST(Journal, CreateSaveLoadAndRefuseToOverwrite) {
  const auto folder = std::filesystem::temp_directory_path() / ("gpuslot-journal-" + std::to_string(::getpid()));
  std::filesystem::remove_all(folder);
  std::filesystem::create_directories(folder);
  const std::string path = (folder / "j.db").string();
  auto jobs = parse_jobs("true\nfalse\n", JobDefaults{});
  ASSERT_TRUE(jobs);
  {
    auto journal = Journal::create(path, *jobs, "jobs.txt", 42);
    ASSERT_TRUE(journal) << journal.error().message;
    auto loaded = journal->load();
    ASSERT_TRUE(loaded);
    ASSERT_EQ(loaded->size(), 2u);
    JobStatus job = (*loaded)[1];
    job.state = JobState::failed;
    job.attempts = 2;
    job.exit_code = 1;
    job.gpu_uuids = {"GPU-a", "GPU-b"};
    job.gpu_indices = {3, 1};
    job.reason = "failed (exit 1)";
    job.started_at = 1.5;
    ASSERT_TRUE(journal->save(job));
    EXPECT_EQ(journal->meta("jobs_hash"), "42");
  }
  auto read = read_journal(path);
  ASSERT_TRUE(read) << read.error().message;
  const JobStatus& job = (*read)[1];
  EXPECT_EQ(job.state, JobState::failed);
  EXPECT_EQ(job.attempts, 2u);
  EXPECT_EQ(job.exit_code, 1);
  EXPECT_FALSE(job.signal);
  EXPECT_EQ(job.gpu_uuids, (std::vector<std::string>{"GPU-a", "GPU-b"}));
  EXPECT_EQ(job.gpu_indices, (std::vector<unsigned>{3, 1}));
  EXPECT_EQ(job.started_at, 1.5);
  EXPECT_EQ((*read)[0].state, JobState::queued);
  auto again = Journal::create(path, *jobs, "jobs.txt", 42);
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().code, Errc::state);
  EXPECT_FALSE(std::filesystem::exists(path + ".new"));
  std::filesystem::remove_all(folder);
}

// A folder of its own under the temp directory, removed at the end.
class Folder {
 public:
  explicit Folder(const std::string& name)
      : path_(std::filesystem::temp_directory_path() / ("gpuslot-" + name + "-" + std::to_string(::getpid()))) {
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~Folder() { std::filesystem::remove_all(path_); }
  std::string operator/(const std::string& name) const { return (path_ / name).string(); }
  std::string str() const { return path_.string(); }
  std::vector<std::string> names() const {
    std::vector<std::string> found;
    for (const auto& entry : std::filesystem::directory_iterator(path_)) found.push_back(entry.path().filename().string());
    std::sort(found.begin(), found.end());
    return found;
  }

 private:
  std::filesystem::path path_;
};

ino_t inode_of(int fd) {
  struct stat info {};
  EXPECT_EQ(::fstat(fd, &info), 0);
  return info.st_ino;
}

ino_t inode_at(const std::string& path) {
  struct stat info {};
  return ::stat(path.c_str(), &info) == 0 ? info.st_ino : 0;
}

std::string text_of(const std::string& path) {
  std::ifstream file(path);
  std::stringstream text;
  text << file.rdbuf();
  return text.str();
}

void write_text(int fd, const std::string& text) { ASSERT_EQ(::write(fd, text.data(), text.size()), ssize_t(text.size())); }

TEST(AttemptFilePool, CreatesWhenNoSpareThenReusesTheInodesOfAConcludedAttempt) {
  Folder logs("attempt-pool");
  AttemptFilePool pool(logs.str());
  const AttemptFiles first = attempt_files(logs.str(), "a", 1);
  auto opened = pool.open(first);
  ASSERT_TRUE(opened) << opened.error().message;
  // The run file is locked for the attempt.
  const int other = ::open(first.run.c_str(), O_RDONLY);
  EXPECT_NE(::flock(other, LOCK_EX | LOCK_NB), 0);
  ::close(other);
  const ino_t run_inode = inode_of(opened->run), out_inode = inode_of(opened->out), err_inode = inode_of(opened->err);
  write_text(opened->run, "pid 123\nsignal 9\n");
  opened->close_all();
  pool.recycle(first);
  EXPECT_EQ(pool.spares(), 3u);
  EXPECT_FALSE(std::filesystem::exists(first.run));
  EXPECT_FALSE(std::filesystem::exists(first.out));  // stayed empty: not kept

  const AttemptFiles second = attempt_files(logs.str(), "b", 1);
  auto again = pool.open(second);
  ASSERT_TRUE(again) << again.error().message;
  const std::set<ino_t> before{run_inode, out_inode, err_inode};
  EXPECT_EQ((std::set<ino_t>{inode_of(again->run), inode_of(again->out), inode_of(again->err)}), before);
  EXPECT_EQ(pool.spares(), 0u);
  // Whatever spare became the run file, the old status is gone: no outcome until one is written.
  EXPECT_FALSE(read_outcome(second.run));
  write_text(again->run, "pid 7\n");
  EXPECT_FALSE(read_outcome(second.run));
  write_text(again->run, "exit 0\n");
  auto outcome = read_outcome(second.run);
  ASSERT_TRUE(outcome);
  EXPECT_EQ(outcome->exit_code, 0);
  EXPECT_EQ(jobs_internal::shepherd_pid(second.run), 7);
  again->close_all();
}

TEST(AttemptFilePool, KeepsLogsWithOutputAndLogsSomeoneStillHoldsOpen) {
  Folder logs("attempt-keep");
  AttemptFilePool pool(logs.str());
  const AttemptFiles files = attempt_files(logs.str(), "job", 2);
  auto opened = pool.open(files);
  ASSERT_TRUE(opened);
  write_text(opened->out, "result\n");
  // A leftover background process of the job still has its (empty) stderr open.
  const int lingering = ::dup(opened->err);
  opened->close_all();
  pool.recycle(files);
  EXPECT_EQ(text_of(files.out), "result\n");
  EXPECT_TRUE(std::filesystem::exists(files.err));
  EXPECT_EQ(pool.spares(), 1u);  // only the run file
  ::close(lingering);
  // Once nobody holds it, an empty log is a spare like the others.
  pool.recycle(files);
  EXPECT_FALSE(std::filesystem::exists(files.err));
  EXPECT_EQ(text_of(files.out), "result\n");
  EXPECT_EQ(pool.spares(), 2u);
}

TEST(AttemptFilePool, ARestartedSchedulerAdoptsTheSparesAndNeverUsesAForeignOrLinkedOne) {
  Folder logs("attempt-adopt");
  {
    AttemptFilePool pool(logs.str());
    const AttemptFiles files = attempt_files(logs.str(), "x", 1);
    auto opened = pool.open(files);
    ASSERT_TRUE(opened);
    opened->close_all();
    pool.recycle(files);
    ASSERT_EQ(pool.spares(), 3u);
  }
  // A spare that gained a second name (a hard link somebody made) is not used.
  const auto names = logs.names();
  ASSERT_EQ(names.size(), 3u);
  const std::string linked = logs / names[0];
  ASSERT_EQ(::link(linked.c_str(), (logs / "keep-me").c_str()), 0);
  const ino_t linked_inode = inode_at(linked);
  AttemptFilePool restarted(logs.str());
  EXPECT_EQ(restarted.spares(), 3u);
  const AttemptFiles files = attempt_files(logs.str(), "y", 1);
  auto opened = restarted.open(files);
  ASSERT_TRUE(opened);
  for (int fd : {opened->run, opened->out, opened->err}) EXPECT_NE(inode_of(fd), linked_inode);
  EXPECT_EQ(inode_at(logs / "keep-me"), linked_inode);
  opened->close_all();
}

bool locked_by_anyone(const std::string& path) {
  const int probe = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (probe < 0) return false;
  const bool locked = ::flock(probe, LOCK_EX | LOCK_NB) != 0;
  ::close(probe);
  return locked;
}

// A lease stand-in: a locked file the shepherd must release (rename to a spare) at the end.
struct FakeLease {
  std::string path;
  int fd = -1;
  explicit FakeLease(const std::string& at) : path(at) {
    fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    EXPECT_EQ(::flock(fd, LOCK_EX | LOCK_NB), 0);
  }
};

// Opens attempt `files`, hands `argv` to `shepherd` with a new lease at `lease_path`, then closes
// this process's copies, as the scheduler does. Call under ASSERT_NO_FATAL_FAILURE.
// Opens an attempt's files and a lease, hands them to `shepherd` and closes this side's copies.
// The reason on failure, "" on success; with no gtest assertion, so a forked child can use it.
std::string try_hand_attempt(ShepherdPool& pool, pid_t shepherd, AttemptFilePool& files_pool, const AttemptFiles& files,
                             const std::string& lease_path, std::vector<std::string> argv) {
  auto opened = files_pool.open(files);
  if (!opened) return "open: " + opened.error().message;
  FakeLease lease(lease_path);
  ShepherdOrder order{std::move(argv), {"PATH=/usr/bin:/bin"}, "", lease.path, *opened, lease.fd};
  auto handed = pool.hand(shepherd, order);
  opened->close_all();
  ::close(lease.fd);
  return handed ? std::string() : "hand: " + handed.error().message;
}

void hand_attempt(ShepherdPool& pool, pid_t shepherd, AttemptFilePool& files_pool, const AttemptFiles& files,
                  const std::string& lease_path, std::vector<std::string> argv) {
  const std::string failed = try_hand_attempt(pool, shepherd, files_pool, files, lease_path, std::move(argv));
  ASSERT_TRUE(failed.empty()) << failed;
}

pid_t wait_for_an_end(ShepherdPool& pool) {
  for (int i = 0; i < 200; ++i) {
    pollfd ready{pool.ended_fd(), POLLIN, 0};
    ::poll(&ready, 1, 50);
    auto ended = pool.ended();
    if (!ended.empty()) return ended.front();
  }
  return 0;
}

// The spare a released lease file became (HeldLease::release keeps it in this user's spare
// directory in its folder).
std::string released_spare(const Folder& folder) {
  const std::filesystem::path spares = folder / (".spares-" + std::to_string(::geteuid()));
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator(spares, error)) return entry.path().string();
  return "";
}

TEST(ShepherdPool, OneShepherdRunsAttemptAfterAttemptAndReleasesEachLease) {
  Folder logs("shepherds");
  Folder leases("shepherd-leases");
  AttemptFilePool files_pool(logs.str());
  ShepherdPool pool;
  pid_t first = 0;
  for (int attempt = 1; attempt <= 2; ++attempt) {
    auto shepherd = pool.idle();
    ASSERT_TRUE(shepherd) << shepherd.error().message;
    if (attempt == 1) first = *shepherd;
    if (attempt == 2) {
      EXPECT_EQ(*shepherd, first) << "the idle first shepherd is reused, not another forked";
    }
    const AttemptFiles files = attempt_files(logs.str(), "job", unsigned(attempt));
    auto opened = files_pool.open(files);
    ASSERT_TRUE(opened);
    FakeLease lease(leases / ("lease-" + std::to_string(attempt)));
    ShepherdOrder order{{"/bin/sh", "-c", "sleep 0.6; echo out-$N; echo err >&2; pwd; exit 3"},
                        {"N=" + std::to_string(attempt), "PATH=/usr/bin:/bin"},
                        "/",
                        lease.path,
                        *opened,
                        lease.fd};
    ASSERT_TRUE(pool.hand(*shepherd, order));
    // While it is busy another is forked, while this process still has the attempt's files and
    // lease open: the new shepherd must not keep them.
    auto other = pool.idle();
    ASSERT_TRUE(other);
    EXPECT_NE(*other, *shepherd);
    opened->close_all();
    ::close(lease.fd);
    EXPECT_TRUE(jobs_internal::attempt_alive(files.run));
    EXPECT_TRUE(locked_by_anyone(lease.path));
    EXPECT_EQ(wait_for_an_end(pool), *shepherd);
    EXPECT_FALSE(jobs_internal::attempt_alive(files.run)) << "nobody else holds the run file";
    auto outcome = read_outcome(files.run);
    ASSERT_TRUE(outcome);
    EXPECT_EQ(outcome->exit_code, 3);
    EXPECT_EQ(jobs_internal::shepherd_pid(files.run), *shepherd);
    EXPECT_EQ(text_of(files.out), "out-" + std::to_string(attempt) + "\n/\n");
    EXPECT_EQ(text_of(files.err), "err\n");
    EXPECT_FALSE(std::filesystem::exists(lease.path)) << "released: renamed to a spare";
    const std::string spare = released_spare(leases);
    ASSERT_FALSE(spare.empty());
    EXPECT_FALSE(locked_by_anyone(spare)) << "nobody else holds the released lease";
    std::filesystem::remove(spare);
    files_pool.recycle(files);
    EXPECT_EQ(files_pool.spares(), 1u) << "the run file; both logs hold output";
  }
  EXPECT_EQ(pool.size(), 2u);
}

TEST(ShepherdPool, AShepherdWhoseSchedulerIsGoneFinishesItsAttemptAndExits) {
  Folder logs("shepherd-orphan");
  AttemptFilePool files_pool(logs.str());
  const AttemptFiles files = attempt_files(logs.str(), "slow", 1);
  const std::string lease_path = logs / "lease";
  pid_t shepherd = 0;
  {
    ShepherdPool pool;
    shepherd = pool.idle().value();
    ASSERT_NO_FATAL_FAILURE(hand_attempt(pool, shepherd, files_pool, files, lease_path, {"/bin/sh", "-c", "sleep 1; echo done"}));
  }  // the pool (the scheduler's end) is gone while the attempt runs
  EXPECT_TRUE(jobs_internal::attempt_alive(files.run));
  EXPECT_TRUE(locked_by_anyone(lease_path));
  int status = 0;
  ASSERT_EQ(::waitpid(shepherd, &status, 0), shepherd);
  EXPECT_TRUE(WIFEXITED(status));
  EXPECT_FALSE(jobs_internal::attempt_alive(files.run));
  auto outcome = read_outcome(files.run);
  ASSERT_TRUE(outcome);
  EXPECT_EQ(outcome->exit_code, 0);
  EXPECT_EQ(text_of(files.out), "done\n");
  EXPECT_FALSE(std::filesystem::exists(lease_path));
}

TEST(ShepherdPool, AJobThatCannotStartIsRecordedAndTheShepherdCarriesOn) {
  Folder logs("shepherd-nostart");
  AttemptFilePool files_pool(logs.str());
  ShepherdPool pool;
  const pid_t shepherd = pool.idle().value();
  const AttemptFiles files = attempt_files(logs.str(), "missing", 1);
  ASSERT_NO_FATAL_FAILURE(hand_attempt(pool, shepherd, files_pool, files, logs / "lease", {"no-such-program-gpuslot"}));
  ASSERT_EQ(wait_for_an_end(pool), shepherd);
  auto outcome = read_outcome(files.run);
  ASSERT_TRUE(outcome);
  EXPECT_EQ(outcome->exit_code, 127);
  EXPECT_NE(outcome->error.find("no-such-program-gpuslot"), std::string::npos);
  EXPECT_NE(text_of(files.err).find("cannot start no-such-program-gpuslot"), std::string::npos);
  EXPECT_EQ(pool.idle().value(), shepherd);
}

TEST(ShepherdPool, ASignalToTheGroupReachesTheCurrentJobAndTheShepherdSurvivesIt) {
  Folder logs("shepherd-signal");
  AttemptFilePool files_pool(logs.str());
  ShepherdPool pool;
  const pid_t shepherd = pool.idle().value();
  for (int attempt = 1; attempt <= 2; ++attempt) {
    const AttemptFiles files = attempt_files(logs.str(), "job", unsigned(attempt));
    ASSERT_NO_FATAL_FAILURE(hand_attempt(pool, shepherd, files_pool, files, logs / ("lease-" + std::to_string(attempt)),
                                         {"/bin/sh", "-c", "echo started; exec sleep 5"}));
    for (int i = 0; i < 500 && text_of(files.out).empty(); ++i) ::usleep(10000);
    ASSERT_EQ(text_of(files.out), "started\n");
    ASSERT_EQ(::kill(-shepherd, SIGTERM), 0);  // what the scheduler does on Ctrl-C / TERM
    ASSERT_EQ(wait_for_an_end(pool), shepherd);
    auto outcome = read_outcome(files.run);
    ASSERT_TRUE(outcome);
    EXPECT_EQ(outcome->signal, SIGTERM) << "attempt " << attempt;
    EXPECT_EQ(pool.idle().value(), shepherd) << "the shepherd ignored it and takes the next attempt";
    files_pool.recycle(files);
  }
}

TEST(ShepherdPool, AShepherdKilledMidAttemptLeavesNoOutcomeAndNoLock) {
  Folder logs("shepherd-killed");
  AttemptFilePool files_pool(logs.str());
  ShepherdPool pool;
  const pid_t shepherd = pool.idle().value();
  const AttemptFiles files = attempt_files(logs.str(), "job", 1);
  const std::string lease_path = logs / "lease";
  ASSERT_NO_FATAL_FAILURE(hand_attempt(pool, shepherd, files_pool, files, lease_path, {"/bin/sh", "-c", "echo started; exec sleep 5"}));
  // Once the job runs (exec'd: the run file and the lease are close-on-exec, so only the
  // shepherd holds them), the shepherd dies.
  for (int i = 0; i < 500 && text_of(files.out).empty(); ++i) ::usleep(10000);
  ASSERT_EQ(text_of(files.out), "started\n");
  ASSERT_EQ(::kill(shepherd, SIGKILL), 0);
  ASSERT_EQ(::waitpid(shepherd, nullptr, 0), shepherd);
  struct KillOrphanedJob {
    pid_t group;
    ~KillOrphanedJob() { ::kill(-group, SIGKILL); }
  } cleanup{shepherd};
  EXPECT_TRUE(pool.forget(shepherd));
  EXPECT_FALSE(read_outcome(files.run)) << "no status: the scheduler requeues the attempt";
  EXPECT_FALSE(jobs_internal::attempt_alive(files.run));
  EXPECT_TRUE(std::filesystem::exists(lease_path));
  EXPECT_FALSE(locked_by_anyone(lease_path)) << "the kernel dropped the dead holder's lock: the lease is gone";
}

TEST(ShepherdPool, HandingToADeadShepherdFailsAndItIsForgotten) {
  Folder logs("shepherd-dead");
  AttemptFilePool files_pool(logs.str());
  ShepherdPool pool;
  const pid_t shepherd = pool.idle().value();
  ASSERT_EQ(::kill(shepherd, SIGKILL), 0);
  ASSERT_EQ(::waitpid(shepherd, nullptr, 0), shepherd);
  const AttemptFiles files = attempt_files(logs.str(), "job", 1);
  auto opened = files_pool.open(files);
  ASSERT_TRUE(opened);
  FakeLease lease(logs / "lease");
  ShepherdOrder order{{"/bin/true"}, {}, "", lease.path, *opened, lease.fd};
  EXPECT_FALSE(pool.hand(shepherd, order));
  opened->close_all();
  EXPECT_TRUE(pool.forget(shepherd));
  EXPECT_FALSE(pool.forget(shepherd));
  EXPECT_EQ(pool.size(), 0u);
  EXPECT_NE(pool.idle().value(), shepherd);
  ::close(lease.fd);
}

TEST(ShepherdPool, TheSchedulerMayOpenAsManySocketsAsTheHardLimitAllowsAndJobsKeepItsOwnLimit) {
  rlimit limit{};
  ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &limit), 0);
  if (limit.rlim_max <= 256) GTEST_SKIP() << "the hard limit on open files is " << limit.rlim_max << ", no room to lower the soft one";
  Folder logs("shepherd-limit");
  const AttemptFiles files = attempt_files(logs.str(), "job", 1);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) try {
    rlimit lowered = limit;
    lowered.rlim_cur = 256;
    if (::setrlimit(RLIMIT_NOFILE, &lowered) != 0) ::_exit(10);
    {
      AttemptFilePool files_pool(logs.str());
      ShepherdPool pool;
      const pid_t shepherd = pool.idle().value();
      rlimit now{};
      ::getrlimit(RLIMIT_NOFILE, &now);
      if (now.rlim_cur != limit.rlim_max) ::_exit(11);
      if (!try_hand_attempt(pool, shepherd, files_pool, files, logs / "lease", {"/bin/sh", "-c", "ulimit -n"}).empty()) {
        ::_exit(12);
      }
      if (wait_for_an_end(pool) != shepherd) ::_exit(14);
    }
    rlimit after{};
    ::getrlimit(RLIMIT_NOFILE, &after);
    ::_exit(after.rlim_cur == 256 ? 0 : 15);  // the pool put its own process's limit back too
  } catch (...) {
    ::_exit(99);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  ASSERT_EQ(WEXITSTATUS(status), 0);
  EXPECT_EQ(text_of(files.out), "256\n");
}

TEST(ShepherdPool, AnOrderWithANulCharacterIsRefusedAndTheShepherdStaysIdle) {
  Folder logs("shepherd-nul");
  AttemptFilePool files_pool(logs.str());
  ShepherdPool pool;
  const pid_t shepherd = pool.idle().value();
  const AttemptFiles files = attempt_files(logs.str(), "job", 1);
  auto opened = files_pool.open(files);
  ASSERT_TRUE(opened);
  FakeLease lease(logs / "lease");
  ShepherdOrder order{{"/bin/echo", std::string("a\0b", 3)}, {}, "", lease.path, *opened, lease.fd};
  auto handed = pool.hand(shepherd, order);
  ASSERT_FALSE(handed);
  EXPECT_EQ(handed.error().code, Errc::bad_input);
  EXPECT_EQ(pool.idle().value(), shepherd);
  EXPECT_EQ(pool.size(), 1u);
  opened->close_all();
  ::close(lease.fd);
}

TEST(ShepherdPool, ASchedulerRunWithoutStandardDescriptorsStillSendsEachStreamToItsLog) {
  Folder logs("shepherd-nostdio");
  const AttemptFiles files = attempt_files(logs.str(), "job", 1);
  // The shepherd, orphaned when the child below exits, becomes this process's child: it must
  // then end by itself (a shepherd that kept the scheduler's end of its socket in 0-2 never did).
  ASSERT_EQ(::prctl(PR_SET_CHILD_SUBREAPER, 1), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) try {
    // With 0, 1 and 2 closed, the shepherd is forked holding its pipe and socket there, and the
    // attempt's files are opened on what is left of them.
    for (int fd = 0; fd < 3; ++fd) ::close(fd);
    AttemptFilePool files_pool(logs.str());
    ShepherdPool pool;
    const pid_t shepherd = pool.idle().value();
    if (!try_hand_attempt(pool, shepherd, files_pool, files, logs / "lease",
                          {"/bin/sh", "-c", "echo to-out; echo to-err >&2"}).empty()) {
      ::_exit(10);
    }
    std::ofstream(logs / "shepherd.pid") << shepherd;
    ::_exit(wait_for_an_end(pool) == shepherd ? 0 : 12);
  } catch (...) {
    ::_exit(99);  // never unwind into the test runner from the forked child
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  ASSERT_EQ(WEXITSTATUS(status), 0);
  EXPECT_EQ(text_of(files.out), "to-out\n");
  EXPECT_EQ(text_of(files.err), "to-err\n");
  const pid_t shepherd = pid_t(std::stol(text_of(logs / "shepherd.pid")));
  pid_t reaped = 0;
  for (int tries = 0; tries < 500 && reaped == 0; ++tries) {
    reaped = ::waitpid(shepherd, &status, WNOHANG);
    if (reaped == 0) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (reaped == 0) ::kill(shepherd, SIGKILL), ::waitpid(shepherd, nullptr, 0);
  ::prctl(PR_SET_CHILD_SUBREAPER, 0);
  EXPECT_EQ(reaped, shepherd) << "the shepherd ends once its scheduler is gone";
}

}  // namespace
}  // namespace gpuslot
