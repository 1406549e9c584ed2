// jobs/shepherd.hpp — the process that runs one attempt of one job.
//
// The scheduler forks a shepherd per attempt. The shepherd takes over the attempt's lease (it
// becomes the lease's holder, so the job's GPU memory is credited against it and the lease lives
// exactly as long as the job), starts the job in its own process group with its output in the
// attempt's log files, waits for it, and writes the exit status to the attempt's status file
// (temp + rename) before it exits. It holds the attempt's lock file for its whole life. Whatever
// happens to the scheduler, the attempt's outcome is therefore one of: status file present (the
// job ended, this is how), lock held (still running), neither (the attempt never ran or its
// shepherd was killed: requeue).
#pragma once

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

// Forks the shepherd of one attempt; returns its pid (it leads its own process group). `lock_fd`
// is the attempt's run file, created empty and already flock'ed; the caller closes its copy after this returns and
// detaches `lease` (the shepherd now owns both). `close_in_child`: the scheduler's own
// descriptors (its journal lock, signalfd…) that the shepherd must not keep alive.
Result<pid_t> start_shepherd(const JobSpec& job, const std::vector<std::string>& environment, HeldLease& lease,
                             const AttemptFiles& files, int lock_fd, const std::vector<int>& close_in_child);

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
