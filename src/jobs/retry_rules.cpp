// retry_rules.cpp — success, out-of-memory retry, failure retry, failure.
#include "jobs/retry_rules.hpp"

#include <algorithm>
#include <chrono>

#include "jobs/shepherd.hpp"

namespace gpuslot::jobs_internal {

namespace {

constexpr std::size_t kTailBytes = 64 * 1024;  // output read back for out-of-memory signatures
constexpr int kTailLines = 5;                   // lines of output kept for a failed job

std::string last_lines(const std::string& text, int count) {
  std::size_t end = text.size();
  while (end > 0 && (text[end - 1] == '\n' || text[end - 1] == '\r')) --end;
  std::size_t start = end;
  for (int found = 0; start > 0; --start) {
    if (text[start - 1] == '\n' && ++found == count) break;
  }
  return text.substr(start, end - start);
}

}  // namespace

double unix_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

void read_attempt_output(AttemptEnd& end, const std::string& out_path, const std::string& err_path) {
  const std::string err = read_tail(err_path, kTailBytes);
  const std::string out = read_tail(out_path, kTailBytes);
  end.output = err + "\n" + out;
  end.tail = last_lines(err, kTailLines);
  if (end.tail.empty()) end.tail = last_lines(out, kTailLines);
}

BatchEvent::Kind settle_attempt(JobStatus& job, const AttemptEnd& end, const BatchOptions& options,
                                const std::string& where, const std::string& retry_hint) {
  job.ended_at = unix_now();
  job.exit_code = end.exit_code;
  job.signal = end.signal;
  if (end.exit_code == 0 && !end.signal && !end.out_of_memory) {
    job.state = JobState::succeeded;
    job.reason.clear();
    job.tail.clear();
    return BatchEvent::Kind::succeeded;
  }
  const bool oom = end.out_of_memory || looks_like_gpu_oom(end.output) ||
                   (end.exit_code && std::find(options.oom_exit_codes.begin(), options.oom_exit_codes.end(),
                                               *end.exit_code) != options.oom_exit_codes.end());
  std::string how = end.signal      ? "killed by signal " + std::to_string(*end.signal)
                    : end.exit_code ? "exit " + std::to_string(*end.exit_code)
                                    : "no exit status";
  if (!end.how.empty()) how = end.how;
  job.tail = end.tail;
  if (oom) {
    ++job.oom_failures;
    for (const auto& uuid : job.gpu_uuids) {
      if (std::find(job.avoid_uuids.begin(), job.avoid_uuids.end(), uuid) == job.avoid_uuids.end()) job.avoid_uuids.push_back(uuid);
    }
    if (job.oom_failures <= job.spec.oom_retries) {
      const double backoff = double(options.oom_backoff.count()) / 1000.0 * double(1u << std::min(job.oom_failures - 1, 6u));
      job.state = JobState::queued;
      job.not_before = unix_now() + backoff;
      job.reason = "out of GPU memory " + where + " (" + how + "); retry " + std::to_string(job.oom_failures) + " of " +
                   std::to_string(job.spec.oom_retries) + retry_hint;
      return BatchEvent::Kind::oom_requeued;
    }
    job.state = JobState::failed;
    job.reason = "out of GPU memory (" + how + ") on " + std::to_string(job.oom_failures) + " attempt" +
                 (job.oom_failures == 1 ? "" : "s") + "; no retries left";
    return BatchEvent::Kind::failed;
  }
  ++job.other_failures;
  if (job.other_failures <= job.spec.failure_retries) {
    // The same back-off as out of memory: a crashing job does not spend its retries at once.
    job.state = JobState::queued;
    job.not_before = unix_now() + double(options.oom_backoff.count()) / 1000.0 *
                                      double(1u << std::min(job.other_failures - 1, 6u));
    job.reason = "failed (" + how + "); retry " + std::to_string(job.other_failures) + " of " +
                 std::to_string(job.spec.failure_retries);
    return BatchEvent::Kind::failure_requeued;
  }
  job.state = JobState::failed;
  job.reason = "failed (" + how + ")";
  return BatchEvent::Kind::failed;
}

}  // namespace gpuslot::jobs_internal
