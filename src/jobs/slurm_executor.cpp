// slurm_executor.cpp — a batch sent to Slurm: one sbatch job per attempt, watched with squeue.
//
// The journal, job states, retry rules (retry_rules.hpp) and events are those of a local batch;
// what differs is who places and starts a job. Here Slurm does, and gpuslot only submits, watches
// and resubmits. Inside each Slurm job the command runs under `gpuslot run`, so the memory check,
// CUDA_DEVICE_ORDER and out-of-memory detection are the same as on a workstation.
//
// Why it is built this way:
// - Exactly once. An attempt is journaled as running *before* sbatch runs and its Slurm job id
//   right after, and every attempt has a Slurm job name of its own (job, attempt, random batch id).
//   An attempt journaled without an id (a crash between the two commits, or an sbatch that gave no
//   clear answer — Slurm can accept a job whose reply is lost) is looked up by that name, in
//   squeue, then sacct, then in the run file its script writes, before anything is submitted
//   again. sbatch runs holding a lock on the attempt's script, so a scheduler that resumes while
//   a dead one's sbatch is still talking to slurmctld waits for it first.
// - Slurm's allocation is never bypassed: gpuslot asks for GPUs with --gres=gpu:N and the job uses
//   what Slurm set in CUDA_VISIBLE_DEVICES; gpuslot's own placement is not used.
// - `after` is Slurm's --dependency=afterok, so the cluster sees the whole graph and starts a
//   dependant as soon as it may. A dependency that fails and is resubmitted gets a new job id: its
//   dependants (pending, with Reason=DependencyNeverSatisfied, as --kill-on-invalid-dep=no keeps
//   them) are repointed with `scontrol update JobId=… Dependency=afterok:…`. One that fails for good
//   fails its dependants, which are cancelled: they would pend forever.
// - A group's later jobs go to the node of its first job (--nodelist) once it has started. Slurm
//   cannot be asked for one GPU index, so they may get other GPUs of that node.
// - An interrupting signal stops submitting and nothing else: submitted jobs belong to the
//   cluster now, and `--resume` reconciles with them. gpuslot cancels only jobs of its own that can
//   never start (their dependency failed).
// - Polling, not callbacks: squeue every poll interval (10 s by default, as workflow tools do, to
//   spare slurmctld), scontrol or sacct only for jobs that ended.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>

#include "gpuslot/units.hpp"
#include "jobs/journal.hpp"
#include "jobs/retry_rules.hpp"
#include "jobs/shepherd.hpp"
#include "jobs/slurm_commands.hpp"

namespace gpuslot {

using namespace jobs_internal;

namespace {

constexpr auto kCommandTimeout = std::chrono::seconds(120);  // Slurm's clients retry for ~60 s themselves
constexpr auto kMaxSubmitBackoff = std::chrono::minutes(5);

std::string absolute(const std::string& path, const std::string& base) {
  return !path.empty() && path[0] == '/' ? path : base + "/" + path;
}

class SlurmBatch {
 public:
  SlurmBatch(std::vector<JobSpec> specs, const BatchOptions& options, BatchObserver& observer)
      : specs_(std::move(specs)), options_(options), observer_(observer) {}

  ~SlurmBatch() {
    for (int fd : {signal_fd_, lock_fd_}) {
      if (fd >= 0) ::close(fd);
    }
    if (signals_blocked_) ::sigprocmask(SIG_SETMASK, &old_mask_, nullptr);
  }

  Result<BatchResult> run() {
    if (auto ready = check_setup(); !ready) return ready.error();
    if (auto opened = open(); !opened) return opened.error();
    setup_signals();
    adopt();
    while (true) {
      auto done = round();
      report_progress();
      if (!done) return done.error();
      if (stopping_ || finished_ == jobs_.size()) break;
      wait_for_next_round();
      read_signals();
    }
    BatchResult result;
    result.interrupted = stopping_;
    result.jobs = std::move(jobs_);
    return result;
  }

 private:
  // --- setting up --------------------------------------------------------------------------------
  Result<void> check_setup() {
    for (const char* program : {"sbatch", "squeue", "scontrol", "scancel"}) {
      if (!on_path(program)) {
        return make_error(Errc::bad_input, std::string("--executor slurm needs Slurm's commands, but ") + program +
                                               " is not on PATH (run on a Slurm login node, or install the Slurm client)");
      }
    }
    const std::string& binary = options_.slurm.gpuslot_path;
    if (binary.empty() || binary[0] != '/' || ::access(binary.c_str(), X_OK) != 0) {
      return make_error(Errc::internal, "the Slurm executor needs the absolute path of the gpuslot binary (got " +
                                            quote_for_message(binary) + ")");
    }
    char directory[PATH_MAX];
    if (::getcwd(directory, sizeof directory) == nullptr) {
      return make_error(Errc::state, std::string("cannot read the current directory: ") + std::strerror(errno));
    }
    cwd_ = directory;
    user_ = std::to_string(::getuid());
    return {};
  }

  Result<void> open() {
    auto opened = open_batch_journal(std::move(specs_), options_);
    if (!opened) return opened.error();
    journal_.emplace(std::move(*opened->journal));
    jobs_ = std::move(opened->jobs);
    after_ = std::move(opened->after);
    groups_ = std::move(opened->groups);
    lock_fd_ = opened->lock_fd;
    char resolved[PATH_MAX];
    logs_dir_ = ::realpath(opened->logs_dir.c_str(), resolved) != nullptr ? std::string(resolved) : absolute(opened->logs_dir, cwd_);
    journal_path_ = absolute(options_.journal_path, cwd_);
    batch_id_ = journal_->meta("batch_id");
    created_at_ = std::atof(journal_->meta("created_at").c_str());
    if (batch_id_.empty()) return make_error(Errc::bad_input, "journal " + quote_for_message(options_.journal_path) + " has no batch id");
    for (const auto& [job, dependencies] : after_) {
      for (std::uint32_t dependency : dependencies) dependants_[dependency].push_back(job);
    }
    for (std::size_t i = 0; i < jobs_.size(); ++i) {
      if (jobs_[i].state == JobState::succeeded) ++succeeded_;
      if (jobs_[i].state == JobState::failed) ++failed_;
    }
    finished_ = succeeded_ + failed_;
    return {};
  }

  void setup_signals() {
    sigset_t set;
    sigemptyset(&set);
    for (int signal_number : {SIGINT, SIGTERM, SIGHUP}) sigaddset(&set, signal_number);
    ::sigprocmask(SIG_BLOCK, &set, &old_mask_);
    signals_blocked_ = true;
    signal_fd_ = ::signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
  }

  void read_signals() {
    signalfd_siginfo info{};
    while (signal_fd_ >= 0 && ::read(signal_fd_, &info, sizeof info) == ssize_t(sizeof info)) stopping_ = true;
  }

  // Jobs a previous scheduler submitted: watched from now on.
  void adopt() {
    for (std::size_t i = 0; i < jobs_.size(); ++i) {
      if (jobs_[i].state != JobState::running) continue;
      const std::string detail = jobs_[i].slurm_job_id.empty() ? "its submission is not confirmed; looking it up in Slurm"
                                                               : "Slurm job " + jobs_[i].slurm_job_id;
      observer_.on_event(BatchEvent{BatchEvent::Kind::adopted, &jobs_[i], detail});
    }
  }

  // --- one round -------------------------------------------------------------------------------
  Result<void> round() {
    resolve_unconfirmed();
    poll_slurm();
    fail_dependants_of_failures();
    Result<void> submitted;
    if (!stopping_) submitted = submit_ready();
    if (auto flushed = flush(); !flushed) return flushed;
    return submitted;
  }

  void wait_for_next_round() {
    auto timeout = options_.slurm.poll_interval;
    const double now = unix_now();
    for (const auto& job : jobs_) {
      if (job.state == JobState::queued && job.not_before && *job.not_before > now) {
        timeout = std::min(timeout, std::chrono::milliseconds(std::int64_t(std::ceil((*job.not_before - now) * 1000))));
      }
    }
    pollfd fd{signal_fd_, POLLIN, 0};
    ::poll(&fd, signal_fd_ >= 0 ? 1 : 0, int(std::max<std::int64_t>(timeout.count(), 1)));
  }

  void touch(std::size_t index, std::optional<BatchEvent::Kind> kind = std::nullopt, std::string detail = "") {
    changed_.insert(index);
    if (kind) events_.push_back({index, *kind, std::move(detail)});
  }

  Result<void> flush() {
    if (!changed_.empty()) {
      std::vector<const JobStatus*> rows;
      for (std::size_t index : changed_) rows.push_back(&jobs_[index]);
      if (auto saved = journal_->save(rows); !saved) return saved;
      changed_.clear();
    }
    for (const auto& event : events_) observer_.on_event(BatchEvent{event.kind, &jobs_[event.job], event.detail});
    events_.clear();
    return {};
  }

  void finish(std::size_t index, BatchEvent::Kind kind) {
    if (kind == BatchEvent::Kind::succeeded) ++succeeded_;
    else ++failed_;
    ++finished_;
    slurm_state_.erase(index);
  }

  void fail(std::size_t index, std::string reason, BatchEvent::Kind kind) {
    JobStatus& job = jobs_[index];
    job.state = JobState::failed;
    job.reason = std::move(reason);
    if (!job.ended_at) job.ended_at = unix_now();
    finish(index, kind);
    touch(index, kind, job.reason);
  }

  void requeue_lost(std::size_t index, std::string reason) {
    JobStatus& job = jobs_[index];
    job.state = JobState::queued;
    job.reason = std::move(reason);
    job.not_before = unix_now() + double(submit_backoff().count()) / 1000.0;
    slurm_state_.erase(index);
    touch(index, BatchEvent::Kind::lost_requeued, job.reason);
  }

  std::chrono::milliseconds submit_backoff() const {
    const auto backoff = options_.slurm.poll_interval * (1ll << std::min(unconfirmed_submissions_, 6u));
    return std::min<std::chrono::milliseconds>(backoff, kMaxSubmitBackoff);
  }

  AttemptFiles files_of(const JobStatus& job) const { return attempt_files(logs_dir_, job.spec.name, job.attempts); }
  std::string script_of(const JobStatus& job) const { return logs_dir_ + "/" + job.spec.name + "." + std::to_string(job.attempts) + ".sh"; }
  std::string name_of(const JobStatus& job) const { return slurm_job_name(batch_id_, job.spec.name, job.attempts); }

  CommandOutput slurm(const std::vector<std::string>& argv, int keep_fd = -1) {
    auto ran = run_command(argv, kCommandTimeout, keep_fd);
    if (!ran) {
      CommandOutput failed;
      failed.exit_code = 127;
      failed.err = ran.error().message;
      return failed;
    }
    return std::move(*ran);
  }

  // --- attempts without a confirmed id ---------------------------------------------------------
  void resolve_unconfirmed() {
    for (std::size_t i = 0; i < jobs_.size(); ++i) {
      JobStatus& job = jobs_[i];
      if (job.state != JobState::running || !job.slurm_job_id.empty()) continue;
      if (!wait_for_submission(job)) return;  // interrupted while waiting
      const std::string name = name_of(job);
      auto listed = slurm({"squeue", "-h", "--states=all", "-u", user_, "--name=" + name, "-o", kSqueueFormat});
      if (listed.exit_code != 0) continue;  // no answer now: ask again next round
      std::optional<SlurmJobRow> found;
      for (auto& row : parse_squeue(listed.out)) {
        if (row.name == name && !found) found = row;
      }
      if (!found && accounting_) {
        auto accounted = slurm({"sacct", "-n", "-X", "-P", "--name=" + name, "-S", slurm_time(created_at_ - 60),
                                "-o", "JobID,JobName,State,ExitCode,NodeList"});
        if (accounted.exit_code != 0) accounting_ = false;  // e.g. AccountingStorageType=accounting_storage/none
        for (auto& row : parse_sacct(accounted.out)) {
          if (row.name == name && !found) found = row;
        }
      }
      if (!found) {
        // Slurm knows no such job now; its script may still have run (Slurm forgets ended jobs
        // after MinJobAge when there is no accounting).
        const ScriptRecord record = parse_script_record(read_tail(files_of(job).run, 64 * 1024));
        if (!record.slurm_job_id.empty()) found = SlurmJobRow{record.slurm_job_id, name, "", record.node, ""};
      }
      // Absent twice, a poll interval apart: a controller still busy with the request has
      // registered it by then.
      if (!found && ++unconfirmed_misses_[i] < 2) continue;
      unconfirmed_misses_.erase(i);
      if (!found) {
        requeue_lost(i, "requeued: its submission was not confirmed and Slurm has no job named " + quote_for_message(name));
        continue;
      }
      job.slurm_job_id = found->id;
      job.reason.clear();
      touch(i, BatchEvent::Kind::submitted, "as Slurm job " + found->id + ", found by its name " + name);
    }
  }

  // Waits while an sbatch of this attempt (a dead scheduler's) still holds the script's lock.
  bool wait_for_submission(const JobStatus& job) {
    const int fd = ::open(script_of(job).c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) return true;
    while (::flock(fd, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK) {
      read_signals();
      if (stopping_) {
        ::close(fd);
        return false;
      }
      ::poll(nullptr, 0, 100);
    }
    ::close(fd);
    return true;
  }

  // --- watching --------------------------------------------------------------------------------
  void poll_slurm() {
    bool any = false;
    for (const auto& job : jobs_) any = any || (job.state == JobState::running && !job.slurm_job_id.empty());
    if (!any) return;
    auto listed = slurm({"squeue", "-h", "--states=all", "-u", user_, "-o", kSqueueFormat});
    if (listed.exit_code != 0) {
      squeue_trouble_ = "squeue failed: " + first_line(listed.err.empty() ? listed.out : listed.err);
      return;
    }
    squeue_trouble_.clear();
    std::map<std::string, SlurmJobRow> rows;
    for (auto& row : parse_squeue(listed.out)) rows.emplace(row.id, std::move(row));
    for (std::size_t i = 0; i < jobs_.size(); ++i) {
      JobStatus& job = jobs_[i];
      if (job.state != JobState::running || job.slurm_job_id.empty()) continue;
      auto it = rows.find(job.slurm_job_id);
      if (it == rows.end()) {
        conclude(i, std::nullopt);
      } else if (slurm_state_is_final(it->second.state)) {
        conclude(i, it->second);
      } else {
        observe(i, it->second);
      }
    }
  }

  void observe(std::size_t index, const SlurmJobRow& row) {
    JobStatus& job = jobs_[index];
    std::string& last = slurm_state_[index];
    const bool was_running = slurm_state_is_running(last);
    last = row.state;
    if (slurm_state_is_running(row.state)) {
      if (!was_running) {
        job.slurm_node = row.node;
        const ScriptRecord record = parse_script_record(read_tail(files_of(job).run, 64 * 1024));
        if (record.slurm_job_id == job.slurm_job_id) job.gpu_indices = record.gpus;
        if (!job.started_at) job.started_at = unix_now();
        job.reason.clear();
        touch(index, BatchEvent::Kind::started, "on node " + row.node + " (Slurm job " + job.slurm_job_id + ")");
      }
      return;
    }
    const std::string reason = row.state + " in Slurm" + (row.reason.empty() || row.reason == "None" ? "" : " (" + row.reason + ")");
    if (job.reason != reason) {
      job.reason = reason;
      touch(index);
    }
  }

  // The attempt's Slurm job ended (`row`), or Slurm no longer lists it (nullopt).
  void conclude(std::size_t index, std::optional<SlurmJobRow> row) {
    JobStatus& job = jobs_[index];
    const AttemptFiles files = files_of(job);
    const std::string id = job.slurm_job_id;
    SlurmExit slurm_exit;
    if (!row && accounting_) {
      // Forgotten by slurmctld (MinJobAge): accounting keeps it, where there is accounting.
      auto accounted = slurm({"sacct", "-n", "-X", "-P", "-j", id, "-o", "JobID,JobName,State,ExitCode,NodeList"});
      if (accounted.exit_code != 0) accounting_ = false;  // e.g. AccountingStorageType=accounting_storage/none
      bool listed = false;
      for (auto& found : parse_sacct(accounted.out)) {
        if (found.id != id) continue;
        listed = true;
        if (slurm_state_is_final(found.state)) {
          slurm_exit = parse_slurm_exit_code(found.reason);
          found.reason.clear();
          row = found;
        }
      }
      if (listed && !row) return;  // its accounting record lags behind: next round
    }
    const ScriptRecord record = parse_script_record(read_tail(files.run, 64 * 1024));
    const bool record_is_ours = record.slurm_job_id == id;
    const auto outcome = record_is_ours ? read_outcome(files.run) : std::nullopt;
    if (record_is_ours) {
      if (!record.node.empty()) job.slurm_node = record.node;
      job.gpu_indices = record.gpus;
    } else if (row && !row->node.empty()) {
      job.slurm_node = row->node;
    }
    if (row && !outcome && row->state != "COMPLETED" && !slurm_exit.exit_code && !slurm_exit.signal) {
      const auto shown = parse_scontrol_fields(slurm({"scontrol", "show", "job", "-o", id}).out);
      if (auto it = shown.find("ExitCode"); it != shown.end()) slurm_exit = parse_slurm_exit_code(it->second);
    }
    auto ended = slurm_attempt_end(outcome, row, slurm_exit);
    if (!ended) {
      requeue_lost(index, "requeued: Slurm job " + id + " is gone and left no result (" +
                              (record_is_ours ? "it started but did not finish" : "it never started") + ")");
      return;
    }
    AttemptEnd& end = *ended;
    if (end.exit_code != 0 || end.signal || !end.how.empty()) {
      read_attempt_output(end, files.out, files.err);
      if (gpuslot_run_found_no_room(end.output)) {
        end.out_of_memory = true;
        end.how = "the GPU Slurm gave had no room for " + format_size(job.spec.memory_bytes);
      }
    }
    const std::string where = "in Slurm job " + id + (job.slurm_node.empty() ? "" : " on " + job.slurm_node);
    const BatchEvent::Kind kind = settle_attempt(job, end, options_, where, "");
    if (record_is_ours && record.started_at) job.started_at = record.started_at;
    if (record_is_ours && record.ended_at) job.ended_at = record.ended_at;
    slurm_state_.erase(index);
    if (kind == BatchEvent::Kind::succeeded || kind == BatchEvent::Kind::failed) finish(index, kind);
    touch(index, kind, job.reason);
  }

  // --- dependencies ----------------------------------------------------------------------------
  void fail_dependants_of_failures() {
    for (bool again = true; again;) {
      again = false;
      for (const auto& [index, dependencies] : after_) {
        JobStatus& job = jobs_[index];
        if (job.state == JobState::succeeded || job.state == JobState::failed) continue;
        if (job.state == JobState::running && job.slurm_job_id.empty()) continue;  // resolved first
        for (std::uint32_t dependency : dependencies) {
          if (jobs_[dependency].state != JobState::failed) continue;
          if (job.state == JobState::running) {
            // Pending behind a dependency that will never succeed: it would wait forever.
            (void)slurm({"scancel", job.slurm_job_id});
          }
          fail(index, "dependency " + quote_for_message(jobs_[dependency].spec.name) + " failed",
               BatchEvent::Kind::dependency_failed);
          again = true;
          break;
        }
      }
    }
  }

  // The ids a job's Slurm dependency lists: those of its dependencies that have not succeeded.
  // nullopt when one has not been submitted yet (the job then waits).
  std::optional<std::vector<std::string>> afterok_of(std::size_t index, std::string& waiting_for) const {
    std::vector<std::string> ids;
    auto it = after_.find(index);
    if (it == after_.end()) return ids;
    for (std::uint32_t dependency : it->second) {
      const JobStatus& other = jobs_[dependency];
      if (other.state == JobState::succeeded) continue;
      if (other.state != JobState::running || other.slurm_job_id.empty()) {
        waiting_for = "waiting for " + quote_for_message(other.spec.name) + " to be submitted";
        return std::nullopt;
      }
      ids.push_back(other.slurm_job_id);
    }
    return ids;
  }

  // A resubmitted job has a new id: its dependants still pending in Slurm wait on the old one.
  void repoint_dependants(std::size_t index) {
    auto it = dependants_.find(index);
    if (it == dependants_.end()) return;
    for (std::size_t dependant : it->second) {
      const JobStatus& job = jobs_[dependant];
      if (job.state != JobState::running || job.slurm_job_id.empty()) continue;
      if (slurm_state_is_running(slurm_state_[dependant])) continue;
      std::string dependency = "Dependency=afterok";
      for (std::uint32_t other : after_.at(dependant)) {
        if (jobs_[other].state != JobState::succeeded && !jobs_[other].slurm_job_id.empty()) dependency += ":" + jobs_[other].slurm_job_id;
      }
      if (dependency == "Dependency=afterok") dependency = "Dependency=";
      (void)slurm({"scontrol", "update", "JobId=" + job.slurm_job_id, dependency});
    }
  }

  // The node a group member must run on ("" = anywhere), or nullopt while the group's first job
  // has not started.
  std::optional<std::string> group_node(std::size_t index, std::string& waiting_for) const {
    const JobStatus& job = jobs_[index];
    if (job.spec.group.empty()) return std::string();
    for (std::size_t member : groups_.at(job.spec.group)) {
      if (member == index) break;
      if (!jobs_[member].slurm_node.empty()) return jobs_[member].slurm_node;
      if (jobs_[member].state != JobState::succeeded && jobs_[member].state != JobState::failed) {
        waiting_for = "waiting for group " + quote_for_message(job.spec.group) + "'s first job to start";
        return std::nullopt;
      }
    }
    return std::string();
  }

  // --- submitting ------------------------------------------------------------------------------
  Result<void> submit_ready() {
    waiting_reason_.clear();
    std::size_t submitted_now = 0;
    for (bool again = true; again && !stopping_;) {
      again = false;
      std::size_t active = 0;
      for (const auto& job : jobs_) active += job.state == JobState::running;
      const double now = unix_now();
      for (std::size_t i = 0; i < jobs_.size() && !stopping_; ++i) {
        JobStatus& job = jobs_[i];
        if (job.state != JobState::queued) continue;
        std::string waiting_for;
        if (options_.max_running > 0 && active >= options_.max_running) {
          waiting_for = "at --max-running " + std::to_string(options_.max_running);
        } else if (job.not_before && *job.not_before > now) {
          waiting_for = "backing off before it is submitted again";
        } else if (auto afterok = afterok_of(i, waiting_for)) {
          if (auto node = group_node(i, waiting_for)) {
            auto submitted = submit(i, *afterok, *node);
            if (!submitted) return submitted.error();
            if (*submitted) {
              ++active;
              ++submitted_now;
              again = true;  // a job later in the file may wait for this one
            }
            read_signals();
            continue;
          }
        }
        if (waiting_reason_.empty()) waiting_reason_ = job.spec.name + ": " + waiting_for;
      }
    }
    return {};
  }

  // Journals the attempt, then runs sbatch. false when it is not submitted now.
  Result<bool> submit(std::size_t index, const std::vector<std::string>& afterok, const std::string& nodelist) {
    JobStatus& job = jobs_[index];
    const JobStatus before = job;
    const bool resubmission = !job.slurm_job_id.empty();
    job.attempts += 1;
    const AttemptFiles files = files_of(job);
    const std::string script_path = script_of(job);
    ScriptInput script;
    script.job = &job.spec;
    script.attempt = job.attempts;
    script.journal = journal_path_;
    script.run_path = files.run;
    script.cwd = job.spec.cwd.empty() ? cwd_ : absolute(job.spec.cwd, cwd_);
    script.gpuslot_path = options_.slurm.gpuslot_path;
    script.gpu_wait = options_.slurm.gpu_wait;
    script.export_format = options_.export_format;
    // Not close-on-exec: sbatch inherits it and holds the lock until it has its answer.
    const int fd = ::open(script_path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_NOFOLLOW, 0755);
    const std::string text = batch_script(script);
    if (fd < 0 || ::flock(fd, LOCK_EX) != 0 || ::write(fd, text.data(), text.size()) != ssize_t(text.size())) {
      const int error = errno;
      if (fd >= 0) ::close(fd);
      job = before;
      return make_error(Errc::state, "cannot write " + quote_for_message(script_path) + ": " + std::strerror(error));
    }
    ::unlink(files.run.c_str());  // left by an attempt of this number that was never submitted
    job.state = JobState::running;
    job.slurm_job_id.clear();
    job.gpu_indices.clear();  // slurm_node stays: the group's later jobs go there
    job.started_at.reset();
    job.ended_at.reset();
    job.exit_code.reset();
    job.signal.reset();
    job.not_before.reset();
    job.reason = "being submitted to Slurm";
    // Durable before sbatch runs: a crash from here on leaves an attempt to look up by name.
    if (auto saved = journal_->save(job); !saved) {
      ::close(fd);
      job = before;
      return saved.error();
    }
    SbatchInput sbatch;
    sbatch.job_name = name_of(job);
    sbatch.comment = "gpuslot batch " + batch_id_ + ": job " + job.spec.name + ", attempt " + std::to_string(job.attempts);
    sbatch.out_path = files.out;
    sbatch.err_path = files.err;
    sbatch.gpus = job.spec.gpus;
    sbatch.afterok = afterok;
    sbatch.nodelist = nodelist;
    sbatch.options = &options_.slurm;
    sbatch.script_path = script_path;
    const CommandOutput result = slurm(sbatch_command(sbatch), fd);
    ::close(fd);
    if (result.exit_code == 0) {
      if (auto id = parse_sbatch_id(result.out)) {
        job.slurm_job_id = *id;
        job.reason = "PENDING in Slurm";
        slurm_state_[index] = "PENDING";
        unconfirmed_submissions_ = 0;
        touch(index, BatchEvent::Kind::submitted,
              "as Slurm job " + *id + (afterok.empty() ? "" : " after " + std::to_string(afterok.size()) + " job(s)") +
                  (nodelist.empty() ? "" : " on " + nodelist));
        if (auto saved = journal_->save(job); !saved) return saved.error();
        if (resubmission) repoint_dependants(index);
        return true;
      }
    }
    const std::string message = sbatch_message(result);
    switch (result.exit_code == 0 ? SbatchRefusal::uncertain : classify_sbatch_failure(result)) {
      case SbatchRefusal::never_fits:
        fail(index, "Slurm cannot run it: " + message, BatchEvent::Kind::never_fits);
        return false;
      case SbatchRefusal::refused:
        job = before;
        touch(index);
        return make_error(Errc::bad_input, "sbatch refused job " + quote_for_message(before.spec.name) + ": " + message +
                                               " (nothing more is submitted; fix the Slurm options and add --resume)");
      case SbatchRefusal::uncertain:
        break;
    }
    // No clear answer: the job may have been accepted. It stays unconfirmed and is looked up by
    // name next round (resolve_unconfirmed) before it can be submitted again.
    ++unconfirmed_submissions_;
    job.reason = "sbatch gave no clear answer (" + (result.timed_out ? std::string("timed out") : message) + "); looking it up";
    touch(index);
    return false;
  }

  void report_progress() {
    BatchProgress progress;
    progress.total = jobs_.size();
    progress.succeeded = succeeded_;
    progress.failed = failed_;
    for (std::size_t i = 0; i < jobs_.size(); ++i) {
      if (jobs_[i].state != JobState::running) continue;
      auto it = slurm_state_.find(i);
      if (it != slurm_state_.end() && slurm_state_is_running(it->second)) ++progress.running;
    }
    progress.waiting = jobs_.size() - finished_ - progress.running;
    progress.waiting_reason = !squeue_trouble_.empty() ? squeue_trouble_ : waiting_reason_;
    if (progress.waiting_reason.empty()) {
      for (std::size_t i = 0; i < jobs_.size(); ++i) {
        if (jobs_[i].state == JobState::running && !slurm_state_is_running(slurm_state_[i]) && !jobs_[i].reason.empty()) {
          progress.waiting_reason = jobs_[i].spec.name + ": " + jobs_[i].reason;
          break;
        }
      }
    }
    observer_.on_progress(progress);
  }

  struct PendingEvent {
    std::size_t job;
    BatchEvent::Kind kind;
    std::string detail;
  };

  std::vector<JobSpec> specs_;  // until the journal is open
  const BatchOptions& options_;
  BatchObserver& observer_;

  std::optional<Journal> journal_;
  std::vector<JobStatus> jobs_;
  std::unordered_map<std::size_t, std::vector<std::uint32_t>> after_;
  std::map<std::size_t, std::vector<std::size_t>> dependants_;
  std::map<std::string, std::vector<std::size_t>> groups_;
  std::string logs_dir_, journal_path_, cwd_, user_, batch_id_;
  double created_at_ = 0;
  std::map<std::size_t, std::string> slurm_state_;  // last state squeue showed, per submitted job
  std::map<std::size_t, unsigned> unconfirmed_misses_;  // lookups by name that found nothing
  std::set<std::size_t> changed_;
  std::vector<PendingEvent> events_;
  std::size_t finished_ = 0, succeeded_ = 0, failed_ = 0;
  unsigned unconfirmed_submissions_ = 0;
  bool accounting_ = true;  // until sacct says otherwise
  std::string waiting_reason_, squeue_trouble_;

  int signal_fd_ = -1, lock_fd_ = -1;
  sigset_t old_mask_{};
  bool signals_blocked_ = false;
  bool stopping_ = false;
};

}  // namespace

Result<BatchResult> run_slurm_batch(std::vector<JobSpec> jobs, const BatchOptions& options, BatchObserver& observer) {
  SlurmBatch batch(std::move(jobs), options, observer);
  return batch.run();
}

}  // namespace gpuslot
