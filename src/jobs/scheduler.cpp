// scheduler.cpp — the batch's event loop: place, start, reap, retry, journal.
//
// One thread. It sleeps in poll() on a signalfd (shepherds dying, Ctrl-C), the shepherds' pipe
// (attempts ended), an inotify watch of the lease directory (a lease released anywhere on the
// host) and a timer (back-offs, and the fallback poll for memory freed outside gpuslot). Each
// wake-up it reaps, records, and places what now fits.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/inotify.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <tuple>
#include <set>
#include <unordered_map>

#include "gpuslot/units.hpp"
#include "jobs/journal.hpp"
#include "jobs/retry_rules.hpp"
#include "jobs/shepherd.hpp"

extern char** environ;

namespace gpuslot {

using namespace jobs_internal;

namespace {

constexpr auto kSnapshotMaxAge = std::chrono::milliseconds(20);
// Starts per pass over the queue before the loop goes back to reap: short jobs end while the
// queue is still being offered room, and their shepherds are reused only once their ends are
// read (until then every start would fork another).
constexpr std::size_t kMostStartsPerPass = 16;

double now_s() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

struct Attempt {
  std::size_t job = 0;
  pid_t shepherd = 0;
  bool adopted = false;
  AttemptFiles files;
};

class Scheduler {
 public:
  Scheduler(std::vector<JobSpec> specs, const BatchOptions& options, Ledger& ledger,
            const SnapshotSource& snapshot_source, const VisibilityOf& visibility_of, BatchObserver& observer)
      : specs_(std::move(specs)), options_(options), ledger_(ledger), snapshot_source_(snapshot_source),
        visibility_of_(visibility_of), observer_(observer) {}

  ~Scheduler() {
    for (int fd : {signal_fd_, inotify_fd_, logs_lock_fd_}) {
      if (fd >= 0) ::close(fd);
    }
    if (signals_blocked_) ::sigprocmask(SIG_SETMASK, &old_mask_, nullptr);
    if (sigio_ignored_) ::sigaction(SIGIO, &old_sigio_, nullptr);
  }

  Result<BatchResult> run() {
    if (auto opened = open_journal(); !opened) return opened.error();
    if (auto ready = setup_events(); !ready) return ready.error();
    if (auto recovered = recover(); !recovered) return recovered.error();
    while (true) {
      if (auto handled = handle_events(); !handled) return handled.error();
      if (!stopping_) {
        if (auto placed = dispatch(); !placed) return placed.error();
      }
      report_progress();
      if (running_.empty() && adopted_.empty() && (stopping_ || finished_ == jobs_.size())) break;
      wait_for_events();
    }
    BatchResult result;
    result.interrupted = stopping_;
    result.jobs = std::move(jobs_);
    return result;
  }

 private:
  // --- journal ---------------------------------------------------------------------------------
  Result<void> open_journal() {
    auto opened = open_batch_journal(std::move(specs_), options_);
    if (!opened) return opened.error();
    journal_.emplace(std::move(*opened->journal));
    jobs_ = std::move(opened->jobs);
    after_ = std::move(opened->after);
    groups_ = std::move(opened->groups);
    logs_dir_ = std::move(opened->logs_dir);
    logs_lock_fd_ = opened->lock_fd;
    attempt_files_.emplace(logs_dir_);
    order_ = opened->order;
    // A group is offered room as one unit, at its largest member's size and its first member's
    // place, so its anchor (the first member) starts before the rest ask for its GPU.
    for (const auto& [name, members] : groups_) {
      OfferKey key{0, 0, members.front()};
      for (std::size_t member : members) {
        const OfferKey own = own_key(member);
        if (std::tie(own.gpus, own.size) > std::tie(key.gpus, key.size)) std::tie(key.gpus, key.size) = std::tie(own.gpus, own.size);
      }
      group_keys_.emplace(name, key);
    }
    for (std::size_t i = 0; i < jobs_.size(); ++i) {
      if (terminal(i)) ++finished_;
      if (jobs_[i].state == JobState::succeeded) ++succeeded_;
      if (jobs_[i].state == JobState::failed) ++failed_;
    }
    return {};
  }

  Result<void> commit(std::vector<std::size_t> indices) {
    std::vector<const JobStatus*> rows;
    for (std::size_t index : indices) rows.push_back(&jobs_[index]);
    return journal_->save(rows);
  }

  bool terminal(std::size_t index) const {
    return jobs_[index].state == JobState::succeeded || jobs_[index].state == JobState::failed;
  }

  // --- events ----------------------------------------------------------------------------------
  Result<void> setup_events() {
    sigset_t set;
    sigemptyset(&set);
    for (int signal_number : {SIGCHLD, SIGINT, SIGTERM, SIGHUP}) sigaddset(&set, signal_number);
    ::sigprocmask(SIG_BLOCK, &set, &old_mask_);
    signals_blocked_ = true;
    // A file lease held for a moment while an attempt's log is recycled (AttemptFilePool) raises
    // SIGIO here if someone opens that file meanwhile; its default action would end the batch.
    struct sigaction ignore {};
    ignore.sa_handler = SIG_IGN;
    sigemptyset(&ignore.sa_mask);
    ::sigaction(SIGIO, &ignore, &old_sigio_);
    sigio_ignored_ = true;
    signal_fd_ = ::signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    if (signal_fd_ < 0) return make_error(Errc::internal, std::string("signalfd: ") + std::strerror(errno));
    inotify_fd_ = ::inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (inotify_fd_ >= 0) ::inotify_add_watch(inotify_fd_, ledger_.directory().c_str(), IN_DELETE | IN_MOVED_FROM);
    return {};
  }

  void wait_for_events() {
    int timeout_ms = -1;
    const double now = now_s();
    bool waiting = false;
    for (std::size_t index : queue_) {
      if (jobs_[index].state != JobState::queued) continue;
      waiting = true;
      if (jobs_[index].not_before && *jobs_[index].not_before > now) {
        const int until = int(std::ceil((*jobs_[index].not_before - now) * 1000));
        timeout_ms = timeout_ms < 0 ? until : std::min(timeout_ms, until);
      }
    }
    const int poll_ms = int(options_.poll_interval.count());
    if ((waiting && !stopping_) || !adopted_.empty()) timeout_ms = timeout_ms < 0 ? poll_ms : std::min(timeout_ms, poll_ms);
    if (dispatch_again_ && !stopping_) timeout_ms = 0;  // the last pass stopped at kMostStartsPerPass
    pollfd fds[3] = {{signal_fd_, POLLIN, 0}, {shepherds_.ended_fd(), POLLIN, 0}, {inotify_fd_, POLLIN, 0}};
    ::poll(fds, inotify_fd_ >= 0 && !stopping_ ? 3 : 2, timeout_ms);  // poll skips a negative fd
  }

  Result<void> handle_events() {
    signalfd_siginfo info{};
    while (::read(signal_fd_, &info, sizeof info) == ssize_t(sizeof info)) {
      if (info.ssi_signo == SIGCHLD) continue;
      interrupt(int(info.ssi_signo));
    }
    if (inotify_fd_ >= 0) {
      char buffer[4096];
      while (::read(inotify_fd_, buffer, sizeof buffer) > 0) {
      }
    }
    // Attempts that ended, then shepherds that died (an attempt they ran is concluded from its
    // run file); their outcomes are recorded in one transaction.
    std::vector<std::size_t> changed;
    auto conclude_running = [this, &changed](pid_t shepherd) {
      auto it = running_.find(shepherd);
      if (it == running_.end()) return;
      Attempt attempt = std::move(it->second);
      running_.erase(it);
      conclude(attempt, changed);
    };
    // Reaped first, ends read second: a shepherd writes its end before it can die, so every end
    // of a reaped shepherd is read before its pid is forgotten (and could be a new shepherd's).
    std::vector<pid_t> dead;
    while (true) {
      int status = 0;
      const pid_t pid = ::waitpid(-1, &status, WNOHANG);
      if (pid <= 0) break;
      dead.push_back(pid);
    }
    for (pid_t shepherd : shepherds_.ended()) conclude_running(shepherd);
    for (pid_t pid : dead) {
      if (shepherds_.forget(pid)) conclude_running(pid);
    }
    for (auto it = adopted_.begin(); it != adopted_.end();) {
      if (attempt_alive(it->files.run)) {
        ++it;
        continue;
      }
      Attempt attempt = std::move(*it);
      it = adopted_.erase(it);
      running_count_ = running_.size() + adopted_.size();
      conclude(attempt, changed);
    }
    running_count_ = running_.size() + adopted_.size();
    return commit_concluded(changed);
  }

  // Commits what conclude() decided; then the concluded attempts' files are spares.
  Result<void> commit_concluded(const std::vector<std::size_t>& changed) {
    if (changed.empty()) return {};
    if (auto done = commit(changed); !done) return done;
    for (const AttemptFiles& files : concluded_files_) attempt_files_->recycle(files);
    concluded_files_.clear();
    for (std::size_t index : changed) emit_pending_(index);
    pending_events_.clear();
    return {};
  }

  void interrupt(int signal_number) {
    const int forwarded = stopping_ ? SIGKILL : signal_number;  // a second Ctrl-C insists
    stopping_ = true;
    stop_signal_ = signal_number;
    for (const auto& [pid, attempt] : running_) ::kill(-pid, forwarded);
    for (const auto& attempt : adopted_) {
      if (pid_t pid = shepherd_pid(attempt.files.run); pid > 0) ::kill(-pid, forwarded);
    }
  }

  // --- outcomes --------------------------------------------------------------------------------
  void conclude(const Attempt& attempt, std::vector<std::size_t>& changed) {
    const std::size_t index = attempt.job;
    JobStatus& job = jobs_[index];
    changed.push_back(index);
    concluded_files_.push_back(attempt.files);
    release_gpus(index);
    auto outcome = read_outcome(attempt.files.run);
    if (!outcome) {
      // No status: the shepherd died without recording (or never ran). The job may not have
      // finished, so it runs again; this is not counted against its retries.
      job.state = JobState::queued;
      job.reason = "requeued: its attempt " + std::to_string(job.attempts) + " vanished without a result";
      enqueue(index);
      pending_events_[index] = {BatchEvent::Kind::lost_requeued, job.reason};
      return;
    }
    if (stopping_ && (outcome->exit_code != 0 || outcome->signal)) {
      // It ended badly after we forwarded the stop signal to it: interrupted, not failed.
      job.ended_at = now_s();
      job.exit_code = outcome->exit_code;
      job.signal = outcome->signal;
      job.state = JobState::queued;
      job.reason = "interrupted (signal " + std::to_string(stop_signal_) + " forwarded); --resume runs it again";
      enqueue(index);
      pending_events_[index] = {BatchEvent::Kind::interrupted, job.reason};
      return;
    }
    AttemptEnd end;
    end.exit_code = outcome->exit_code;
    end.signal = outcome->signal;
    end.how = outcome->error;
    if (outcome->exit_code != 0 || outcome->signal) read_attempt_output(end, attempt.files.out, attempt.files.err);
    const BatchEvent::Kind kind = settle_attempt(job, end, options_, "on GPU " + gpu_list(job), ", another GPU first");
    if (kind == BatchEvent::Kind::succeeded) {
      ++succeeded_;
      ++finished_;
    } else if (kind == BatchEvent::Kind::failed) {
      ++failed_;
      ++finished_;
    } else {
      enqueue(index);
    }
    pending_events_[index] = {kind, job.reason};
  }

  void fail(std::size_t index, std::string reason, BatchEvent::Kind kind = BatchEvent::Kind::failed) {
    JobStatus& job = jobs_[index];
    job.state = JobState::failed;
    job.reason = std::move(reason);
    if (!job.ended_at) job.ended_at = now_s();
    ++failed_;
    ++finished_;
    pending_events_[index] = {kind, job.reason};
  }

  static std::string gpu_list(const JobStatus& job) {
    std::string text;
    for (unsigned index : job.gpu_indices) text += (text.empty() ? "" : ",") + std::to_string(index);
    return text;
  }

  void emit_pending_(std::size_t index) {
    auto it = pending_events_.find(index);
    if (it == pending_events_.end()) return;
    observer_.on_event(BatchEvent{it->second.first, &jobs_[index], it->second.second});
  }

  // --- resume ----------------------------------------------------------------------------------
  Result<void> recover() {
    std::vector<std::size_t> changed;
    for (std::size_t i = 0; i < jobs_.size(); ++i) {
      if (jobs_[i].state == JobState::queued) queue_.push_back(i);
      if (jobs_[i].state != JobState::running) continue;
      Attempt attempt{i, 0, true, attempt_files(logs_dir_, jobs_[i].spec.name, jobs_[i].attempts)};
      if (attempt_alive(attempt.files.run)) {
        attempt.shepherd = shepherd_pid(attempt.files.run);
        occupy_gpus(i);
        adopted_.push_back(attempt);
        observer_.on_event(BatchEvent{BatchEvent::Kind::adopted, &jobs_[i], "still running; adopted"});
      } else {
        conclude(attempt, changed);
      }
    }
    running_count_ = adopted_.size();
    std::sort(queue_.begin(), queue_.end(), [this](std::size_t a, std::size_t b) { return offered_before(a, b); });
    return commit_concluded(changed);
  }

  // --- placement -------------------------------------------------------------------------------
  // Whether queued job `a` is offered the free room before `b` (BatchOptions::order): largest
  // first (more GPUs, then whole GPUs, then more memory), a group as one unit, then file order.
  struct OfferKey {
    unsigned gpus;
    std::uint64_t size;
    std::size_t place;  // file position (a group's: its first member's)
  };
  OfferKey own_key(std::size_t index) const {
    const JobSpec& job = jobs_[index].spec;
    return {job.gpus, job.exclusive ? UINT64_MAX : job.memory_bytes, index};
  }
  OfferKey offer_key(std::size_t index) const {
    const std::string& group = jobs_[index].spec.group;
    return group.empty() ? own_key(index) : group_keys_.at(group);
  }
  bool offered_before(std::size_t a, std::size_t b) const {
    if (order_ == JobOrder::largest_first) {
      const OfferKey x = offer_key(a);
      const OfferKey y = offer_key(b);
      if (x.gpus != y.gpus) return x.gpus > y.gpus;
      if (x.size != y.size) return x.size > y.size;
      if (x.place != y.place) return x.place < y.place;
    }
    return a < b;
  }

  // A requeued job goes back to its place in the order, not to the end.
  void enqueue(std::size_t index) {
    queue_.insert(std::upper_bound(queue_.begin(), queue_.end(), index,
                                   [this](std::size_t a, std::size_t b) { return offered_before(a, b); }),
                  index);
  }

  void occupy_gpus(std::size_t index) {
    for (unsigned gpu : jobs_[index].gpu_indices) {
      occupancy_[gpu].first += 1;
      occupancy_[gpu].second += jobs_[index].spec.memory_bytes;
    }
  }

  void release_gpus(std::size_t index) {
    for (unsigned gpu : jobs_[index].gpu_indices) {
      auto& [count, bytes] = occupancy_[gpu];
      count = count > 0 ? count - 1 : 0;
      bytes = bytes > jobs_[index].spec.memory_bytes ? bytes - jobs_[index].spec.memory_bytes : 0;
    }
  }

  Result<const Snapshot*> fresh_snapshot() {
    const auto now = std::chrono::steady_clock::now();
    if (!snapshot_ || now - snapshot_at_ > kSnapshotMaxAge) {
      auto taken = snapshot_source_();
      if (!taken) return taken.error();
      snapshot_ = std::move(*taken);
      snapshot_at_ = now;
      visibility_ = visibility_of_(*snapshot_);
    }
    return &*snapshot_;
  }

  // Why a job cannot be considered yet (dependencies, group), or nullopt when it can.
  // Sets `failed_dependency` when it never can.
  std::optional<std::string> blocked(std::size_t index, std::optional<std::string>& failed_dependency,
                                     std::optional<std::vector<std::string>>& pinned) {
    const JobStatus& job = jobs_[index];
    if (auto it = after_.find(index); it != after_.end()) {
      for (std::uint32_t dependency_index : it->second) {
        const JobStatus& dependency = jobs_[dependency_index];
        if (dependency.state == JobState::failed) {
          failed_dependency = "dependency " + quote_for_message(dependency.spec.name) + " failed";
          return failed_dependency;
        }
        if (dependency.state != JobState::succeeded) return "waiting for " + quote_for_message(dependency.spec.name);
      }
    }
    if (!job.spec.group.empty()) {
      for (std::size_t member : groups_.at(job.spec.group)) {
        if (member == index) break;  // the first placeable member anchors the group
        if (!jobs_[member].gpu_uuids.empty()) {
          pinned = jobs_[member].gpu_uuids;
          break;
        }
        if (!terminal(member)) return "waiting for group " + quote_for_message(job.spec.group) + "'s first job to start";
      }
    }
    if (job.not_before && *job.not_before > now_s()) return "backing off after out of memory";
    return std::nullopt;
  }

  Requirements requirements_of(const JobStatus& job, const std::optional<std::vector<std::string>>& pinned,
                               const Snapshot& snapshot) const {
    Requirements requirements;
    requirements.memory_bytes = job.spec.memory_bytes;
    requirements.gpu_count = job.spec.gpus;
    requirements.strategy = options_.strategy;
    requirements.exclude = options_.exclude;
    if (pinned) {
      for (const auto& gpu : snapshot.gpus) {
        if (std::find(pinned->begin(), pinned->end(), gpu.uuid) == pinned->end()) requirements.exclude.push_back(std::to_string(gpu.nvml_index));
      }
      return requirements;
    }
    if (!job.avoid_uuids.empty()) {
      // Another GPU first — as long as some other GPU could ever hold the job.
      unsigned others = 0;
      for (const auto& gpu : snapshot.gpus) {
        const bool avoided = std::find(job.avoid_uuids.begin(), job.avoid_uuids.end(), gpu.uuid) != job.avoid_uuids.end();
        if (!avoided && gpu.healthy && visibility_.is_candidate(gpu.nvml_index) &&
            gpu.memory_total_bytes.value_or(0) >= job.spec.memory_bytes) {
          ++others;
        }
      }
      if (others >= job.spec.gpus) {
        for (const auto& gpu : snapshot.gpus) {
          if (std::find(job.avoid_uuids.begin(), job.avoid_uuids.end(), gpu.uuid) != job.avoid_uuids.end()) {
            requirements.exclude.push_back(std::to_string(gpu.nvml_index));
          }
        }
      }
    }
    return requirements;
  }

  // Exclusive: GPUs with no process and nothing reserved; the job reserves all their free memory.
  bool make_exclusive(Requirements& requirements, const Snapshot& snapshot, const OutstandingReservations& reserved) {
    std::vector<unsigned> empty;
    for (const auto& gpu : snapshot.gpus) {
      const std::string index = std::to_string(gpu.nvml_index);
      const bool excluded = std::find(requirements.exclude.begin(), requirements.exclude.end(), index) != requirements.exclude.end() ||
                            std::find(requirements.exclude.begin(), requirements.exclude.end(), gpu.uuid) != requirements.exclude.end();
      auto outstanding = reserved.find(gpu.nvml_index);
      if (!excluded && gpu.healthy && visibility_.is_candidate(gpu.nvml_index) && gpu.processes.empty() &&
          (outstanding == reserved.end() || outstanding->second == 0) && gpu.memory_free_bytes &&
          *gpu.memory_free_bytes >= requirements.memory_bytes) {
        empty.push_back(gpu.nvml_index);
      }
    }
    if (empty.size() < requirements.gpu_count) return false;
    empty.resize(requirements.gpu_count);
    std::uint64_t free = UINT64_MAX;
    for (unsigned index : empty) free = std::min(free, *snapshot.gpus[index].memory_free_bytes);
    requirements.memory_bytes = free;
    for (const auto& gpu : snapshot.gpus) {
      if (std::find(empty.begin(), empty.end(), gpu.nvml_index) == empty.end()) requirements.exclude.push_back(std::to_string(gpu.nvml_index));
    }
    return true;
  }

  Result<void> dispatch() {
    dispatch_again_ = false;
    if (queue_.empty()) return {};
    if (options_.max_running > 0 && running_count_ >= options_.max_running) return {};
    auto snapshot_or = fresh_snapshot();
    if (!snapshot_or) return snapshot_or.error();
    const Snapshot& snapshot = **snapshot_or;
    std::vector<std::string> warnings;
    std::vector<LeaseRecord> leases = ledger_.live_leases(&warnings);
    OutstandingReservations reserved = Ledger::outstanding(leases, snapshot);
    // Smallest request (per GPU count) that did not fit this round: larger ones are skipped.
    std::map<unsigned, std::uint64_t> smallest_misfit;
    std::vector<std::size_t> still_queued;
    std::vector<std::size_t> dependency_failures;
    waiting_reason_.clear();
    const double now = now_s();
    bool full = false;
    std::size_t starts = 0;

    for (std::size_t position = 0; position < queue_.size(); ++position) {
      const std::size_t index = queue_[position];
      JobStatus& job = jobs_[index];
      if (job.state != JobState::queued) continue;
      if (full || (options_.max_running > 0 && running_count_ >= options_.max_running) || starts == kMostStartsPerPass) {
        dispatch_again_ = dispatch_again_ || starts == kMostStartsPerPass;
        full = true;
        still_queued.push_back(index);
        continue;
      }
      std::optional<std::string> failed_dependency;
      std::optional<std::vector<std::string>> pinned;
      if (auto why = blocked(index, failed_dependency, pinned)) {
        if (failed_dependency) {
          fail(index, *failed_dependency, BatchEvent::Kind::dependency_failed);
          dependency_failures.push_back(index);
          continue;
        }
        if (waiting_reason_.empty()) waiting_reason_ = job.spec.name + ": " + *why;
        still_queued.push_back(index);
        continue;
      }
      const bool plain = !pinned && job.avoid_uuids.empty() && !job.spec.exclusive;
      if (plain) {
        auto misfit = smallest_misfit.find(job.spec.gpus);
        if (misfit != smallest_misfit.end() && job.spec.memory_bytes >= misfit->second) {
          still_queued.push_back(index);
          continue;
        }
      }
      Requirements requirements = requirements_of(job, pinned, snapshot);
      // Never fits: decide on an idle host (nothing used, nothing reserved).
      auto decision = select_gpus(requirements, snapshot, visibility_, reserved);
      if (!decision || decision->impossible) {
        fail(index, "can never fit: " + (decision ? decision->summary : decision.error().message), BatchEvent::Kind::never_fits);
        dependency_failures.push_back(index);
        continue;
      }
      if (job.spec.exclusive && !make_exclusive(requirements, snapshot, reserved)) {
        if (waiting_reason_.empty()) waiting_reason_ = job.spec.name + ": waiting for a GPU with nothing else on it";
        still_queued.push_back(index);
        continue;
      }
      if (job.spec.exclusive) decision = select_gpus(requirements, snapshot, visibility_, reserved);
      if (!decision || !decision->fits()) {
        if (plain) smallest_misfit[job.spec.gpus] = job.spec.memory_bytes;
        if (waiting_reason_.empty() && decision) waiting_reason_ = job.spec.name + ": " + decision->summary;
        still_queued.push_back(index);
        continue;
      }
      auto started = start(index, requirements, snapshot, now);
      if (!started) return started.error();
      if (*started == Start::refused) {
        if (plain) smallest_misfit[job.spec.gpus] = job.spec.memory_bytes;
        still_queued.push_back(index);
        continue;
      }
      if (*started == Start::no_shepherd) {
        full = true;  // none can be made until one is free: the rest wait for the next pass
        still_queued.push_back(index);
        continue;
      }
      if (*started == Start::failed) {
        dependency_failures.push_back(index);  // committed and reported with those below
        continue;
      }
      for (unsigned gpu : jobs_[index].gpu_indices) reserved[gpu] += requirements.memory_bytes;
      ++starts;
    }
    queue_ = std::move(still_queued);
    if (!dependency_failures.empty()) {
      if (auto done = commit(dependency_failures); !done) return done;
      for (std::size_t index : dependency_failures) emit_pending_(index);
      pending_events_.clear();
    }
    return {};
  }

  std::vector<std::string> job_environment(const JobStatus& job, const Snapshot& snapshot, const std::string& lease_id) const {
    // The job's own settings first, gpuslot's last: a job's "env" cannot move it off its GPUs.
    std::vector<std::pair<std::string, std::string>> settings = job.spec.env;
    for (auto& setting : child_gpu_env(snapshot, job.gpu_indices, options_.export_format).set) settings.push_back(std::move(setting));
    settings.emplace_back("GPUSLOT_LEASE_ID", lease_id);
    settings.emplace_back("GPUSLOT_JOB_NAME", job.spec.name);
    settings.emplace_back("GPUSLOT_JOB_ATTEMPT", std::to_string(job.attempts));
    return child_environment(environ, settings);
  }

  // What start() did with a job: `refused` and `no_shepherd` leave it queued.
  enum class Start {
    started,
    refused,      // the ledger refused: another launch took the room first
    no_shepherd,  // no shepherd can be made now (descriptors, processes) while one is busy
    failed,       // the job can never be handed over (fail()ed; the caller commits it)
  };

  // Reserve, journal, hand to a shepherd.
  Result<Start> start(std::size_t index, const Requirements& requirements, const Snapshot& snapshot, double now) {
    JobStatus& job = jobs_[index];
    auto shepherd = shepherds_.idle();
    if (!shepherd) {
      if (shepherd.error().code == Errc::nothing_fits) return Start::no_shepherd;
      return shepherd.error();
    }
    ReserveRequest request;
    request.requirements = requirements;
    request.command = "batch " + job.spec.name + ": " + job.spec.display_command();
    request.owner_pid = *shepherd;  // it holds the lease, and the job is its child
    const Snapshot* cached = &snapshot;
    auto reservation = ledger_.reserve(
        request, [cached]() -> Result<Snapshot> { return *cached; }, visibility_of_);
    if (!reservation) return reservation.error();
    if (!reservation->lease) return Start::refused;

    const unsigned attempt = job.attempts + 1;
    const AttemptFiles files = attempt_files(logs_dir_, job.spec.name, attempt);
    auto opened = attempt_files_->open(files);
    if (!opened) return opened.error();
    // The transition is durable before it takes effect.
    const JobStatus before = job;
    job.state = JobState::running;
    job.attempts = attempt;
    job.gpu_indices = reservation->decision.chosen;
    job.gpu_uuids.clear();
    for (unsigned gpu : job.gpu_indices) job.gpu_uuids.push_back(snapshot.gpus[gpu].uuid);
    job.started_at = now;
    job.ended_at.reset();
    job.exit_code.reset();
    job.signal.reset();
    job.not_before.reset();
    job.reason.clear();
    if (auto done = commit({index}); !done) {
      job = before;
      opened->close_all();
      return done.error();
    }
    ShepherdOrder order{job_words(job.spec), job_environment(job, snapshot, reservation->lease->record().id), job.spec.cwd,
                        reservation->lease->record().path, *opened, reservation->lease->descriptor()};
    auto handed = shepherds_.hand(*shepherd, order);
    opened->close_all();
    if (!handed) {
      // The attempt never ran; its lease goes with `reservation`. (Were the scheduler to stop
      // before the next commit, --resume would find the attempt without a lock or a status and
      // requeue it.)
      job = before;
      if (handed.error().code == Errc::bad_input) {  // an order no shepherd can take
        fail(index, handed.error().message);
        return Start::failed;
      }
      if (handed.error().code != Errc::nothing_fits) return handed.error();
      // The shepherd died before taking it: put down, reaped later; the job stays queued.
      if (auto undone = commit({index}); !undone) return undone.error();
      ::kill(*shepherd, SIGKILL);
      shepherds_.forget(*shepherd);
      return Start::refused;
    }
    reservation->lease->detach();  // the shepherd holds it now
    running_[*shepherd] = Attempt{index, *shepherd, false, files};
    running_count_ = running_.size() + adopted_.size();
    occupy_gpus(index);
    observer_.on_event(BatchEvent{BatchEvent::Kind::started, &job, ""});
    return Start::started;
  }

  void report_progress() {
    BatchProgress progress;
    progress.total = jobs_.size();
    progress.succeeded = succeeded_;
    progress.failed = failed_;
    progress.running = running_count_;
    progress.waiting = jobs_.size() - finished_ - running_count_;
    for (const auto& [gpu, load] : occupancy_) progress.gpus.push_back({gpu, load.first, load.second});
    progress.waiting_reason = waiting_reason_;
    observer_.on_progress(progress);
  }

  std::vector<JobSpec> specs_;  // until the journal is open; then each lives in jobs_
  const BatchOptions& options_;
  Ledger& ledger_;
  const SnapshotSource& snapshot_source_;
  const VisibilityOf& visibility_of_;
  BatchObserver& observer_;

  std::optional<Journal> journal_;
  std::string logs_dir_;
  std::optional<AttemptFilePool> attempt_files_;
  ShepherdPool shepherds_;
  std::vector<AttemptFiles> concluded_files_;  // recycled once their outcomes are committed
  bool dispatch_again_ = false;                // the last pass stopped at kMostStartsPerPass
  std::vector<JobStatus> jobs_;
  std::unordered_map<std::size_t, std::vector<std::uint32_t>> after_;  // jobs with `after`: what they wait for
  std::map<std::string, std::vector<std::size_t>> groups_;
  std::vector<std::size_t> queue_;  // queued jobs, in the order they are offered room (offered_before)
  JobOrder order_ = JobOrder::largest_first;
  std::map<std::string, OfferKey> group_keys_;
  std::map<pid_t, Attempt> running_;
  std::vector<Attempt> adopted_;
  std::size_t running_count_ = 0;
  std::size_t finished_ = 0, succeeded_ = 0, failed_ = 0;
  std::map<unsigned, std::pair<unsigned, std::uint64_t>> occupancy_;
  std::map<std::size_t, std::pair<BatchEvent::Kind, std::string>> pending_events_;
  std::string waiting_reason_;

  std::optional<Snapshot> snapshot_;
  std::chrono::steady_clock::time_point snapshot_at_{};
  Visibility visibility_;

  int signal_fd_ = -1, inotify_fd_ = -1, logs_lock_fd_ = -1;
  sigset_t old_mask_{};
  bool signals_blocked_ = false;
  struct sigaction old_sigio_ {};
  bool sigio_ignored_ = false;
  bool stopping_ = false;
  int stop_signal_ = 0;
};

}  // namespace

Result<BatchResult> run_batch(std::vector<JobSpec> jobs, const BatchOptions& options, Ledger& ledger,
                              const SnapshotSource& snapshot_source, const VisibilityOf& visibility_of,
                              BatchObserver& observer) {
  if (options.executor == BatchExecutor::slurm) return run_slurm_batch(std::move(jobs), options, observer);
  Scheduler scheduler(std::move(jobs), options, ledger, snapshot_source, visibility_of, observer);
  return scheduler.run();
}

}  // namespace gpuslot
