// jobs/retry_rules.hpp — what an ended attempt means for its job, the same for every executor.
//
// A clean exit succeeds. A GPU out-of-memory failure (a signature in the attempt's output, an
// exit code given with --oom-exit-code, or what the executor knows to mean the same) requeues the
// job with a doubling back-off until its `oom_retries` are spent; any other failure requeues it
// only while `failure_retries` last. Local and Slurm batches both go through settle_attempt, so
// a job is retried the same way wherever it runs.
#pragma once

#include <optional>
#include <string>

#include "gpuslot/jobs.hpp"

namespace gpuslot::jobs_internal {

// How one attempt ended, with what it printed.
struct AttemptEnd {
  std::optional<int> exit_code;
  std::optional<int> signal;
  std::string how;            // replaces "exit N" / "killed by signal N" in reasons ("" = those)
  bool out_of_memory = false; // the executor knows it was out of GPU memory, whatever it printed
  std::string output;         // the last 64 KiB of stderr, then of stdout: signatures are sought here
  std::string tail;           // the last lines of stderr (else stdout), kept for a failed job
};

// Reads an attempt's output files into `end.output` and `end.tail`.
void read_attempt_output(AttemptEnd& end, const std::string& out_path, const std::string& err_path);

// Applies `end` to `job`: state, exit code or signal, ended_at, failure counts, tail, reason and,
// for an out-of-memory retry, not_before and the GPUs to avoid. `where` names the attempt's
// place in an out-of-memory reason ("on GPU 0", "in Slurm job 12 on node n1"); `retry_hint` is
// appended to that reason (", another GPU first"). Returns succeeded, oom_requeued,
// failure_requeued or failed; the caller requeues or counts the job.
BatchEvent::Kind settle_attempt(JobStatus& job, const AttemptEnd& end, const BatchOptions& options,
                                const std::string& where, const std::string& retry_hint);

// Unix seconds now (journal timestamps).
double unix_now();

}  // namespace gpuslot::jobs_internal
