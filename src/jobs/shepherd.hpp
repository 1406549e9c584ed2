// jobs/shepherd.hpp — the processes that run the attempts of a batch's jobs.
//
// A shepherd is forked from the scheduler once and then runs one attempt after another, each
// handed to it over its socket with the attempt's files and lease (SCM_RIGHTS). For each it
// holds the lease (it is the lease's holder, so the job's GPU memory is credited against it and
// the lease ends with the attempt), starts the job in its process group with its output in the
// attempt's log files, waits for it, appends the exit status to the attempt's run file, releases
// the lease and tells the scheduler. It holds the run file locked while the attempt runs. Whatever
// happens to the scheduler, an attempt's outcome is therefore one of: status in the run file (the
// job ended, this is how), lock held (still running), neither (the attempt never ran or its
// shepherd was killed: requeue). A shepherd whose scheduler is gone finishes its attempt and
// exits. Forking once per shepherd rather than once per attempt keeps the scheduler's pages from
// being copied on write after every start: that was two fifths of its CPU with short jobs.
#pragma once

#include <sys/resource.h>
#include <sys/types.h>

#include <optional>
#include <string>
#include <vector>

#include "gpuslot/jobs.hpp"
#include "gpuslot/lease.hpp"

namespace gpuslot::jobs_internal {

struct AttemptFiles {
  std::string run, out, err;  // <logs>/<name>.<attempt>.run|out|err
};
AttemptFiles attempt_files(const std::string& logs_dir, const std::string& name, unsigned attempt);

// How an attempt ended, as its status file says.
struct AttemptOutcome {
  std::optional<int> exit_code;
  std::optional<int> signal;
  std::string error;  // the job could not be started (exec failed): exit_code is 127 or 126
};

// An attempt's three files, open: `run` flock'ed and without a status (empty, or NULs over an
// old one), `out` and `err` empty, for appending.
struct OpenedAttemptFiles {
  int run = -1, out = -1, err = -1;
  void close_all();
};

// Spare inodes for attempt files, one pool per logs folder (its scheduler is the only writer
// there). Where every create scans recently freed inodes (ext4 without a journal: 0.2–0.5 ms a
// create on the test machines) three creates per attempt were a third of the CPU of a batch of
// short jobs. A concluded attempt's run file, and its logs when they stayed empty and no process
// holds them open, are renamed `.spare-N`; a later attempt's files are spares renamed back (and
// emptied), created only when none is left. So a log that stayed empty is usually not kept (it
// is where leases are not supported, or past 1024 spares).
class AttemptFilePool {
 public:
  explicit AttemptFilePool(std::string logs_dir);  // adopts the spares an earlier run left
  Result<OpenedAttemptFiles> open(const AttemptFiles& files);
  // Call once the attempt's outcome is committed: its run file is no longer evidence.
  void recycle(const AttemptFiles& files);
  std::size_t spares() const { return spares_.size(); }

 private:
  int take(const std::string& target, int flags);
  void give_back(const std::string& path, bool only_if_empty);
  std::string logs_dir_;
  std::vector<std::string> spares_;  // names in logs_dir_
  unsigned long next_ = 0;
};

// One attempt for a shepherd: the words to run (argv[0] searched in PATH when it has no '/'),
// its environment and folder, and what it takes over: the attempt's files and the lease (whose
// file is `lease_path`). The caller closes its own copies once handed.
struct ShepherdOrder {
  std::vector<std::string> argv;
  std::vector<std::string> environment;
  std::string cwd;
  std::string lease_path;
  OpenedAttemptFiles files;
  int lease_fd = -1;
};

// The batch's shepherds. Each leads its own process group, in which its jobs run: a signal sent
// to -pid reaches its attempt's job (and whatever earlier jobs of that shepherd left behind);
// the shepherd itself ignores SIGINT, SIGTERM, SIGHUP and SIGQUIT, not SIGKILL.
class ShepherdPool {
 public:
  ShepherdPool() = default;
  ShepherdPool(const ShepherdPool&) = delete;
  ShepherdPool& operator=(const ShepherdPool&) = delete;
  // Closes the sockets, so idle shepherds exit (and are reaped here) and busy ones exit after
  // their attempt.
  ~ShepherdPool();

  // Readable when an attempt ended (then call ended()).
  int ended_fd() const { return ended_read_; }
  // An idle shepherd, forked when none is. A new shepherd closes every descriptor it inherits
  // but 0-2, its socket and the pipe. Errc::nothing_fits when no descriptor or process can be made
  // now while some shepherd is busy (try again once one is free); Errc::state otherwise.
  Result<pid_t> idle();
  // Hands `order` to `shepherd` (from idle()), which is busy until it reports the end.
  // Errc::bad_input for an order no shepherd can take (a NUL in a field, over 1 GiB);
  // Errc::nothing_fits when the shepherd is gone (it died); Errc::state otherwise.
  Result<void> hand(pid_t shepherd, const ShepherdOrder& order);
  // Shepherds whose attempts ended since the last call; they are idle again.
  std::vector<pid_t> ended();
  // A shepherd that died (reaped by the caller) is forgotten. False if it is not one of ours.
  bool forget(pid_t shepherd);
  std::size_t size() const { return members_.size(); }

 private:
  struct Member {
    pid_t pid = 0;
    int socket = -1;
    bool busy = false;
  };
  Member* find(pid_t pid);
  std::vector<Member> members_;
  int ended_read_ = -1, ended_write_ = -1;
  rlimit files_limit_{};  // RLIMIT_NOFILE as this process had it (jobs get it back)
  bool raised_files_limit_ = false;
};

// The words a job runs: its argv, or its shell line exec'd directly when plain (direct_argv),
// else `/bin/sh -c LINE`.
std::vector<std::string> job_words(const JobSpec& job);

// The status a run file records; nullopt when it has none (still running, or lost).
std::optional<AttemptOutcome> read_outcome(const std::string& run_path);

// True while some process (the shepherd) holds the attempt's run file locked.
bool attempt_alive(const std::string& run_path);

// Pid the shepherd wrote into its run file (0 if none yet).
pid_t shepherd_pid(const std::string& run_path);

// A shell line that means the same run directly: plain words (no quoting, expansion,
// redirection, operators) whose first word is not a shell builtin, keyword or assignment. As
// make does, such a line is exec'd without /bin/sh (one process start less per job).
std::optional<std::vector<std::string>> direct_argv(const std::string& line);

// The last `max_bytes` of a log file.
std::string read_tail(const std::string& path, std::size_t max_bytes);

}  // namespace gpuslot::jobs_internal
