// pool.cpp — the worker pool's parent side: the queue, the dispatcher thread, leases per worker,
// requeue on out of memory or death, results in order. The worker side is pool_worker.cpp.
//
// Threads: callers (submit, wait, map, cancel, close) only touch the queue and the results under
// `mutex`. One dispatcher thread owns the workers: it takes leases, forks, writes tasks, reads
// results and reaps. It never holds `mutex` while it forks, waits for a lease, does socket I/O
// or runs a callback, so a caller that holds an interpreter lock (Python's GIL) while it takes
// `mutex` can never deadlock with a dispatcher that needs that interpreter lock to fork or to
// deliver a result. The dispatcher runs with every asynchronous signal blocked (signals go to
// the application's threads); workers get back the mask of the thread that created the pool.
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <thread>

#include "api/pool_protocol.hpp"
#include "api/pool_worker.hpp"
#include "api/session.hpp"
#include "gpuslot/gpuslot.hpp"
#include "gpuslot/pool.hpp"

namespace gpuslot {

using pool_protocol::Frame;
using pool_protocol::FrameKind;
using Clock = std::chrono::steady_clock;

namespace {

// How often a pool that has fewer workers than GPUs looks for room for another (NVML + ledger).
constexpr auto kGrowthInterval = std::chrono::milliseconds(1000);
// How long a GPU where a worker's init ran out of memory comes after the others.
constexpr auto kAvoidAfterInitOutOfMemory = std::chrono::seconds(30);

std::string describe_exit(int status) {
  if (WIFSIGNALED(status)) {
    const int signal_number = WTERMSIG(status);
    const char* name = sigabbrev_np(signal_number);
    return "killed by signal " + std::to_string(signal_number) + (name != nullptr ? std::string(" (SIG") + name + ")" : "");
  }
  if (WIFEXITED(status)) return "exited with status " + std::to_string(WEXITSTATUS(status));
  return "stopped";
}

std::string where(const WorkerDevice& device) {
  return device.device + " (GPU " + std::to_string(device.nvml_index) + ", worker " + std::to_string(device.worker) + ")";
}

struct Task {
  WorkerPool::TaskId id = 0;
  std::string payload;
  unsigned attempts = 0;
  std::vector<std::string> failed_uuids;  // GPUs where an attempt ran out of memory or its worker died
  std::vector<std::string> history;
  WorkerPool::Callback on_done;
  std::optional<WorkerDevice> device;
  bool running = false;
};

struct Worker {
  WorkerDevice device;
  std::optional<GpuLease> lease;
  pid_t pid = 0;
  int fd = -1;
  pool_protocol::FrameReader reader;
  enum class State { starting, idle, busy } state = State::starting;
  std::optional<WorkerPool::TaskId> task;
  std::size_t done = 0;
};

const char* state_name(Worker::State state) {
  switch (state) {
    case Worker::State::starting: return "starting";
    case Worker::State::idle: return "idle";
    case Worker::State::busy: return "busy";
  }
  return "?";
}

constexpr const char* kClosedMessage = "cancelled: the pool was closed";

struct Delivery {
  WorkerPool::TaskId id;
  WorkerPool::Callback on_done;
  TaskResult result;
};

}  // namespace

struct WorkerPool::Impl {
  PoolOptions options;
  WorkerProgram program;

  // --- shared with callers, under `mutex` ---
  mutable std::mutex mutex;
  std::condition_variable finished_changed;
  std::map<TaskId, Task> tasks;           // queued or running
  std::deque<TaskId> queue;               // queued, in dispatch order
  std::map<TaskId, TaskResult> finished;  // done, not yet taken by wait()
  std::vector<WorkerInfo> worker_info;
  std::optional<Error> failure;
  bool failure_in_init = false;
  bool closing = false;
  bool started = false;
  TaskId next_id = 1;
  std::chrono::milliseconds grace{2000};
  std::thread dispatcher;
  std::atomic<bool> stop{false};
  int wake_fd = -1;
  sigset_t creator_mask{};

  // --- the dispatcher's own ---
  std::vector<Worker> workers;
  std::optional<unsigned> target;  // how many workers to run (known after the first reading)
  bool growth_stopped = false;     // no further GPU can ever take a worker
  Clock::time_point next_growth{};
  unsigned init_failures = 0;
  // GPUs where a worker's init ran out of memory recently: the next workers go elsewhere first.
  std::vector<std::pair<std::string, Clock::time_point>> avoided;
  std::string state_directory;
  std::vector<Delivery> deliveries;

  ~Impl() {
    if (wake_fd >= 0) ::close(wake_fd);
  }

  void wake() const {
    const std::uint64_t one = 1;
    if (wake_fd < 0) return;
    [[maybe_unused]] const ssize_t written = ::write(wake_fd, &one, sizeof one);
  }

  // ----- results (call with `mutex` held) -----

  void finish_locked(Task& task, TaskResult result) {
    result.attempts = task.attempts;
    result.history = task.history;
    result.device = task.device;
    if (task.on_done) {
      deliveries.push_back({task.id, std::move(task.on_done), std::move(result)});
    } else {
      finished[task.id] = std::move(result);
    }
    tasks.erase(task.id);
    finished_changed.notify_all();
  }

  void deliver() {
    std::vector<Delivery> ready;
    {
      std::lock_guard<std::mutex> lock(mutex);
      ready.swap(deliveries);
    }
    for (auto& delivery : ready) delivery.on_done(delivery.id, delivery.result);
  }

  void publish_workers() {
    std::vector<WorkerInfo> info;
    for (const auto& worker : workers) {
      info.push_back({worker.device, worker.pid, state_name(worker.state), worker.done, worker.lease ? worker.lease->id() : ""});
    }
    std::lock_guard<std::mutex> lock(mutex);
    worker_info = std::move(info);
  }

  // ----- fatal errors -----

  void fail(Error error, bool in_init) {
    stop_all_workers();
    std::lock_guard<std::mutex> lock(mutex);
    if (failure) return;
    failure = error;
    failure_in_init = in_init;
    queue.clear();
    std::vector<TaskId> ids;
    for (const auto& [id, task] : tasks) ids.push_back(id);
    for (TaskId id : ids) {
      TaskResult result;
      result.status = TaskResult::Status::failed;
      result.message = error.message;
      finish_locked(tasks.at(id), std::move(result));
    }
  }

  void stop_all_workers() {
    for (auto& worker : workers) {
      if (worker.pid > 0) {
        ::kill(worker.pid, SIGKILL);
        int status = 0;
        while (::waitpid(worker.pid, &status, 0) < 0 && errno == EINTR) {
        }
      }
      if (worker.fd >= 0) ::close(worker.fd);
      if (worker.lease) worker.lease->release();
    }
    workers.clear();
  }

  // ----- starting workers -----

  std::vector<int> pool_descriptors() const {
    std::vector<int> fds{wake_fd};
    for (const auto& worker : workers) fds.push_back(worker.fd);
    return fds;
  }

  // Forks the worker of `slot` on its leased GPU. False (with the pool failed) when fork fails.
  bool spawn(std::size_t slot) {
    Worker& worker = workers[slot];
    int sockets[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sockets) != 0) {
      fail(make_error(Errc::state, std::string("cannot start a worker: ") + std::strerror(errno)), false);
      return false;
    }
    pool_internal::WorkerSetup setup;
    setup.fd = sockets[1];
    setup.close_fds = pool_descriptors();
    setup.close_fds.push_back(sockets[0]);
    setup.device = worker.device;
    setup.parent = ::getpid();
    setup.signal_mask = creator_mask;
    setup.state_directory = state_directory;
    std::fflush(nullptr);  // or the child would flush the parent's buffered output a second time
    const pid_t pid = program.fork_process ? program.fork_process() : ::fork();
    if (pid == 0) pool_internal::run_worker(setup, program);  // never returns
    const int fork_errno = errno;
    ::close(sockets[1]);
    if (pid < 0) {
      ::close(sockets[0]);
      fail(make_error(Errc::state, std::string("cannot start a worker: fork: ") + std::strerror(fork_errno)), false);
      return false;
    }
    worker.pid = pid;
    worker.fd = sockets[0];
    worker.reader = {};
    worker.state = Worker::State::starting;
    worker.task.reset();
    ::fcntl(worker.fd, F_SETFL, ::fcntl(worker.fd, F_GETFL) | O_NONBLOCK);
    return true;
  }

  // How many workers: `workers`, or one per visible GPU. False when the pool failed.
  bool decide_target() {
    if (target) return true;
    auto snapshot = api::snapshot();
    if (!snapshot) {
      fail(std::move(snapshot).error(), false);
      return false;
    }
    const Visibility visibility = current_visibility(*snapshot);
    if (visibility.ambiguity) {
      fail(make_error(Errc::bad_input, *visibility.ambiguity), false);
      return false;
    }
    const auto visible = unsigned(visibility.visible.size());
    if (visible == 0) {
      fail(make_error(Errc::nothing_fits, snapshot->gpus.empty() ? std::string("no NVIDIA GPU on this host")
                                                                 : "no GPU is visible to this process (CUDA_VISIBLE_DEVICES)"),
           false);
      return false;
    }
    if (options.workers && *options.workers > visible) {
      fail(make_error(Errc::bad_input, "a pool of " + std::to_string(*options.workers) + " workers needs as many GPUs, but " +
                                           std::to_string(visible) + (visible == 1 ? " is" : " are") + " visible"),
           false);
      return false;
    }
    target = options.workers.value_or(visible);
    return true;
  }

  // Reserves a GPU for one more worker and starts it. `block`: wait for room (no worker runs).
  void grow(bool block) {
    LeaseRequest request;
    request.memory_bytes = options.memory_bytes;
    request.exclude = options.exclude;
    for (const auto& worker : workers) request.exclude.push_back(worker.device.uuid);  // one worker per GPU
    request.strategy = options.strategy;
    request.command = options.command;
    Explanation explanation;
    // GPUs where init recently ran out of memory come last: first a try without them.
    const auto now = Clock::now();
    avoided.erase(std::remove_if(avoided.begin(), avoided.end(), [now](const auto& entry) { return entry.second < now; }),
                  avoided.end());
    if (!avoided.empty()) {
      LeaseRequest elsewhere = request;
      for (const auto& [uuid, until] : avoided) elsewhere.exclude.push_back(uuid);
      auto lease = acquire_lease(elsewhere, &explanation);
      if (lease) {
        start_worker(std::move(*lease));
        return;
      }
      if (lease.error().code != Errc::nothing_fits) {
        fail(lease.error(), false);
        return;
      }
    }
    if (block && options.wait) {
      request.wait = true;
      request.timeout = options.wait_timeout;
      request.cancelled = [this] { return stop.load(); };
    }
    auto lease = acquire_lease(request, &explanation);
    if (!lease) {
      const Error& error = lease.error();
      if (stop.load()) return;  // closing while waiting
      if (error.code != Errc::nothing_fits || block) {
        fail(error.code == Errc::nothing_fits && !options.wait ? make_error(Errc::nothing_fits, error.message + " (the pool was told not to wait)")
                                                               : error,
             false);
        return;
      }
      if (explanation.waiting_cannot_help) growth_stopped = true;  // every other GPU is too small, or none is left
      next_growth = Clock::now() + kGrowthInterval;
      return;
    }
    start_worker(std::move(*lease));
  }

  void start_worker(GpuLease lease) {
    if (lease.cuda_ordinals().empty()) {
      fail(make_error(Errc::bad_input, "the CUDA ordinal of GPU " + std::to_string(lease.nvml_indices().front()) +
                                           " is ambiguous in this process; set CUDA_DEVICE_ORDER=PCI_BUS_ID"),
           false);
      return;
    }
    std::vector<bool> numbers(workers.size() + 1, false);
    for (const auto& worker : workers) {
      if (worker.device.worker < numbers.size()) numbers[worker.device.worker] = true;
    }
    Worker worker;
    worker.device.worker = unsigned(std::find(numbers.begin(), numbers.end(), false) - numbers.begin());
    worker.device.cuda_ordinal = lease.cuda_ordinals().front();
    worker.device.device = "cuda:" + std::to_string(worker.device.cuda_ordinal);
    worker.device.nvml_index = lease.nvml_indices().front();
    worker.device.uuid = lease.uuids().front();
    worker.lease = std::move(lease);
    workers.push_back(std::move(worker));
    spawn(workers.size() - 1);
  }

  // ----- dispatching -----

  bool has_queued() const {
    std::lock_guard<std::mutex> lock(mutex);
    return !queue.empty();
  }

  // A requeued task goes to a GPU where it has not failed, unless no live worker offers one.
  std::optional<TaskId> pick_locked(const Worker& worker) {
    auto failed_here = [&](const Task& task) {
      return std::find(task.failed_uuids.begin(), task.failed_uuids.end(), worker.device.uuid) != task.failed_uuids.end();
    };
    auto nowhere_else = [&](const Task& task) {
      return std::all_of(workers.begin(), workers.end(), [&](const Worker& other) {
        return std::find(task.failed_uuids.begin(), task.failed_uuids.end(), other.device.uuid) != task.failed_uuids.end();
      });
    };
    for (auto it = queue.begin(); it != queue.end(); ++it) {
      const Task& task = tasks.at(*it);
      if (!failed_here(task) || nowhere_else(task)) {
        const TaskId id = *it;
        queue.erase(it);
        return id;
      }
    }
    return std::nullopt;
  }

  void dispatch() {
    for (auto& worker : workers) {
      if (worker.state != Worker::State::idle) continue;
      const std::string* payload = nullptr;
      TaskId id = 0;
      {
        std::lock_guard<std::mutex> lock(mutex);
        auto picked = pick_locked(worker);
        if (!picked) continue;
        id = *picked;
        Task& task = tasks.at(id);
        ++task.attempts;
        task.running = true;
        task.device = worker.device;
        payload = &task.payload;  // stable: only this thread removes a running task
      }
      worker.state = Worker::State::busy;
      worker.task = id;
      // A failed write means the worker died: its end-of-file arrives at the next poll.
      pool_protocol::write_frame(worker.fd, Frame{FrameKind::task, id, {}, *payload});
    }
  }

  // An attempt of the worker's task failed (out of memory, or the worker died): requeue it at the
  // front, or give up after `retries` requeues. `retry` false: the failure is final (`message`).
  void attempt_failed(Worker& worker, const std::string& why, const std::string& message, std::string payload, bool retry) {
    if (!worker.task) return;
    std::lock_guard<std::mutex> lock(mutex);
    auto it = tasks.find(*worker.task);
    worker.task.reset();
    if (it == tasks.end()) return;
    Task& task = it->second;
    task.running = false;
    task.history.push_back("attempt " + std::to_string(task.attempts) + " on " + where(worker.device) + ": " + why);
    TaskResult result;
    if (retry && closing) {
      result.status = TaskResult::Status::cancelled;
      result.message = kClosedMessage;
    } else if (retry && task.attempts <= options.retries) {
      task.failed_uuids.push_back(worker.device.uuid);
      queue.push_front(task.id);
      return;
    } else {
      result.status = TaskResult::Status::failed;
      result.payload = std::move(payload);
      result.message = retry ? "gave up after " + std::to_string(task.attempts) + " attempts (retries=" +
                                   std::to_string(options.retries) + "); last: " + why
                             : message;
    }
    finish_locked(task, std::move(result));
  }

  // The worker's task will not finish: the pool is closing.
  void cancel_running(Worker& worker) {
    if (!worker.task) return;
    std::lock_guard<std::mutex> lock(mutex);
    auto it = tasks.find(*worker.task);
    worker.task.reset();
    if (it == tasks.end()) return;
    TaskResult result;
    result.status = TaskResult::Status::cancelled;
    result.message = kClosedMessage;
    finish_locked(it->second, std::move(result));
  }

  void handle_frame(std::size_t slot, Frame frame) {
    Worker& worker = workers[slot];
    switch (frame.kind) {
      case FrameKind::ready:
        worker.state = Worker::State::idle;
        init_failures = 0;
        return;
      case FrameKind::init_failed: {
        const std::string why = "init on " + where(worker.device) + " failed: " + frame.message;
        if (!looks_like_out_of_memory(frame.message)) {
          fail(make_error(Errc::internal, "worker " + why), true);
          return;
        }
        // Someone outside gpuslot holds memory the ledger could not see: give the GPU back and
        // look again later, another GPU first.
        if (++init_failures > options.retries) {
          fail(make_error(Errc::nothing_fits, "workers ran out of memory while starting " + std::to_string(init_failures) +
                                                  " times in a row; last: " + why + " (reserve more memory)"),
               true);
          return;
        }
        avoided.emplace_back(worker.device.uuid, Clock::now() + kAvoidAfterInitOutOfMemory);
        retire(slot);
        return;
      }
      case FrameKind::succeeded: {
        worker.state = Worker::State::idle;
        ++worker.done;
        if (!worker.task) return;
        std::lock_guard<std::mutex> lock(mutex);
        auto it = tasks.find(*worker.task);
        worker.task.reset();
        if (it == tasks.end()) return;
        TaskResult result;
        result.status = TaskResult::Status::succeeded;
        result.payload = std::move(frame.payload);
        finish_locked(it->second, std::move(result));
        return;
      }
      case FrameKind::failed: {
        worker.state = Worker::State::idle;
        ++worker.done;
        const bool out_of_memory = looks_like_out_of_memory(frame.message);
        attempt_failed(worker, (out_of_memory ? "out of memory: " : "failed: ") + frame.message, frame.message,
                       std::move(frame.payload), out_of_memory);
        return;
      }
      case FrameKind::task: return;
    }
  }

  // Reaps a worker whose socket closed; returns how it ended.
  std::string reap(Worker& worker) {
    if (worker.fd >= 0) ::close(worker.fd);
    worker.fd = -1;
    int status = 0;
    const auto deadline = Clock::now() + std::chrono::seconds(1);
    for (;;) {
      const pid_t done = ::waitpid(worker.pid, &status, WNOHANG);
      if (done == worker.pid) break;
      if (done < 0 && errno != EINTR) return "gone";
      if (Clock::now() > deadline) ::kill(worker.pid, SIGKILL);  // closed its socket but lingers
      ::poll(nullptr, 0, 5);
    }
    worker.pid = 0;
    return describe_exit(status);
  }

  // Removes a worker and gives its GPU back.
  void retire(std::size_t slot) {
    Worker& worker = workers[slot];
    if (worker.pid > 0) reap(worker);
    if (worker.lease) worker.lease->release();
    workers.erase(workers.begin() + std::ptrdiff_t(slot));
  }

  void worker_died(std::size_t slot) {
    Worker& worker = workers[slot];
    const Worker::State state = worker.state;
    const std::string how = reap(worker);
    if (closing_now()) {
      cancel_running(worker);
      retire(slot);
      return;
    }
    if (state == Worker::State::starting) {
      if (++init_failures > options.retries) {
        fail(make_error(Errc::internal, "worker on " + where(worker.device) + " died while starting (" + how + "), " +
                                            std::to_string(init_failures) + " times in a row"),
             true);
        return;
      }
    } else if (state == Worker::State::busy) {
      attempt_failed(worker, "worker died (" + how + ")", {}, {}, /*retry=*/true);
    }
    spawn(slot);  // a replacement on the same GPU, under the same lease
  }

  bool closing_now() const {
    std::lock_guard<std::mutex> lock(mutex);
    return closing;
  }

  // Waits for frames, deaths or a wake-up; at most `timeout`.
  void poll_workers(std::chrono::milliseconds timeout) {
    std::vector<pollfd> fds{{wake_fd, POLLIN, 0}};
    for (const auto& worker : workers) fds.push_back({worker.fd, POLLIN, 0});
    const int ready = ::poll(fds.data(), fds.size(), int(timeout.count()));
    if (ready <= 0) return;
    if ((fds[0].revents & POLLIN) != 0) {
      std::uint64_t count = 0;
      [[maybe_unused]] auto ignored = ::read(wake_fd, &count, sizeof count);
    }
    // Back to front: a retired worker is erased from the vector.
    for (std::size_t k = workers.size(); k-- > 0;) {
      if (k + 1 >= fds.size() || fds[k + 1].revents == 0 || fds[k + 1].fd != workers[k].fd) continue;
      const bool open = workers[k].reader.fill(workers[k].fd);
      while (k < workers.size()) {
        auto frame = workers[k].reader.next();
        if (!frame) break;
        const std::size_t before = workers.size();
        handle_frame(k, std::move(*frame));
        if (workers.size() != before || failed()) break;  // retired, or everything stopped
      }
      if (failed()) return;
      if (!open && k < workers.size() && workers[k].fd == fds[k + 1].fd) worker_died(k);
      if (failed()) return;
    }
  }

  bool failed() const {
    std::lock_guard<std::mutex> lock(mutex);
    return failure.has_value();
  }

  // ----- the dispatcher -----

  void run() {
    {
      auto directory = api::ledger();
      if (directory) state_directory = directory->directory();
    }
    while (!closing_now()) {
      if (!failed() && has_queued() && decide_target()) {
        if (workers.empty()) {
          grow(/*block=*/true);
        } else if (workers.size() < *target && !growth_stopped && Clock::now() >= next_growth) {
          grow(/*block=*/false);
        }
      }
      if (!failed()) dispatch();
      publish_workers();
      deliver();
      auto timeout = std::chrono::milliseconds(1000);
      if (!failed() && target && workers.size() < *target && !growth_stopped && has_queued()) {
        const auto until = std::chrono::duration_cast<std::chrono::milliseconds>(next_growth - Clock::now());
        timeout = std::clamp(until, std::chrono::milliseconds(0), timeout);
      }
      poll_workers(timeout);
      publish_workers();
      deliver();
    }
    shut_down();
    publish_workers();
    deliver();
  }

  // End of input to every worker, `grace` to finish the running task, then SIGKILL.
  void shut_down() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      for (TaskId id : queue) {
        TaskResult result;
        result.message = kClosedMessage;
        finish_locked(tasks.at(id), std::move(result));
      }
      queue.clear();
    }
    for (auto& worker : workers) {
      if (worker.fd >= 0) ::shutdown(worker.fd, SHUT_WR);
    }
    const auto deadline = Clock::now() + grace;
    while (!workers.empty() && Clock::now() < deadline) {
      std::vector<pollfd> fds;
      for (const auto& worker : workers) fds.push_back({worker.fd, POLLIN, 0});
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      if (::poll(fds.data(), fds.size(), int(std::max<long long>(1, left.count()))) <= 0) continue;
      for (std::size_t k = workers.size(); k-- > 0;) {
        if (fds[k].revents == 0) continue;
        const bool open = workers[k].reader.fill(workers[k].fd);
        while (auto frame = workers[k].reader.next()) {
          if (frame->kind == FrameKind::succeeded || frame->kind == FrameKind::failed) handle_frame(k, std::move(*frame));
        }
        if (!open) {
          cancel_running(workers[k]);
          retire(k);
        }
      }
    }
    for (auto& worker : workers) cancel_running(worker);
    stop_all_workers();
  }
};

// ----- the public face -----

WorkerPool::WorkerPool(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

WorkerPool::~WorkerPool() { close(); }

Result<std::unique_ptr<WorkerPool>> WorkerPool::create(PoolOptions options, WorkerProgram program) {
  if (!program.work) return make_error(Errc::bad_input, "a worker pool needs a work function");
  if (options.workers && (*options.workers == 0 || *options.workers > 1024)) {
    return make_error(Errc::bad_input, "invalid number of workers " + std::to_string(*options.workers) + ": expected 1 or more");
  }
  if (options.retries > 1000) {
    return make_error(Errc::bad_input, "invalid retries " + std::to_string(options.retries) + ": expected 0 to 1000");
  }
  if (options.wait_timeout && options.wait_timeout->count() < 0) {
    return make_error(Errc::bad_input, "invalid timeout: expected zero or more");
  }
  for (const auto& token : options.exclude) {
    auto parsed = parse_exclude_list(token);
    if (!parsed) return std::move(parsed).error();
  }
  if (options.command.empty()) options.command = api::default_command("WorkerPool");
  auto impl = std::make_unique<Impl>();
  impl->options = std::move(options);
  impl->program = std::move(program);
  impl->wake_fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (impl->wake_fd < 0) return make_error(Errc::state, std::string("cannot create a worker pool: ") + std::strerror(errno));
  return std::unique_ptr<WorkerPool>(new WorkerPool(std::move(impl)));
}

Result<WorkerPool::TaskId> WorkerPool::submit(std::string payload, Callback on_done) {
  Impl& impl = *impl_;
  TaskId id = 0;
  {
    std::lock_guard<std::mutex> lock(impl.mutex);
    if (impl.closing) return make_error(Errc::state, "the worker pool is closed");
    if (impl.failure) return *impl.failure;
    id = impl.next_id++;
    Task task;
    task.id = id;
    task.payload = std::move(payload);
    task.on_done = std::move(on_done);
    impl.tasks.emplace(id, std::move(task));
    impl.queue.push_back(id);
    if (!impl.started) {
      impl.started = true;
      // Asynchronous signals stay with the application's threads; crashes stay where they happen.
      sigset_t blocked;
      sigfillset(&blocked);
      for (int kept : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT, SIGTRAP}) sigdelset(&blocked, kept);
      pthread_sigmask(SIG_BLOCK, &blocked, &impl.creator_mask);
      impl.dispatcher = std::thread([&impl] { impl.run(); });
      pthread_sigmask(SIG_SETMASK, &impl.creator_mask, nullptr);
    }
  }
  impl.wake();
  return id;
}

Result<std::optional<TaskResult>> WorkerPool::wait(TaskId id, std::optional<std::chrono::milliseconds> timeout) {
  Impl& impl = *impl_;
  std::unique_lock<std::mutex> lock(impl.mutex);
  auto taken = [&]() -> std::optional<TaskResult> {
    auto it = impl.finished.find(id);
    if (it == impl.finished.end()) return std::nullopt;
    TaskResult result = std::move(it->second);
    impl.finished.erase(it);
    return result;
  };
  if (auto result = taken()) return result;
  auto pending = impl.tasks.find(id);
  if (pending == impl.tasks.end()) return make_error(Errc::bad_input, "no task " + std::to_string(id) + " is waiting to be taken");
  if (pending->second.on_done) return make_error(Errc::bad_input, "task " + std::to_string(id) + " reports to its callback");
  auto done = [&] { return impl.finished.count(id) != 0; };
  if (timeout) {
    if (!impl.finished_changed.wait_for(lock, *timeout, done)) return std::optional<TaskResult>();
  } else {
    impl.finished_changed.wait(lock, done);
  }
  return taken();
}

Result<std::vector<TaskResult>> WorkerPool::map(std::vector<std::string> payloads) {
  std::vector<TaskId> ids;
  for (auto& payload : payloads) {
    auto id = submit(std::move(payload));
    if (!id) {
      cancel(ids);
      return std::move(id).error();
    }
    ids.push_back(*id);
  }
  std::vector<TaskResult> results;
  for (TaskId id : ids) {
    auto result = wait(id);
    if (!result) return std::move(result).error();
    results.push_back(std::move(**result));
  }
  if (auto error = failure()) return *error;
  return results;
}

void WorkerPool::cancel(const std::vector<TaskId>& ids) {
  Impl& impl = *impl_;
  std::lock_guard<std::mutex> lock(impl.mutex);
  for (TaskId id : ids) {
    auto queued = std::find(impl.queue.begin(), impl.queue.end(), id);
    if (queued == impl.queue.end()) continue;
    impl.queue.erase(queued);
    TaskResult result;
    result.message = "cancelled";
    impl.finish_locked(impl.tasks.at(id), std::move(result));
  }
}

std::vector<WorkerInfo> WorkerPool::workers() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->worker_info;
}

std::optional<Error> WorkerPool::failure() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->failure;
}

bool WorkerPool::failed_in_worker_init() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->failure_in_init;
}

void WorkerPool::close(std::chrono::milliseconds grace) {
  Impl& impl = *impl_;
  {
    std::lock_guard<std::mutex> lock(impl.mutex);
    if (!impl.closing) {
      impl.closing = true;
      impl.grace = grace;
    }
    impl.stop = true;
  }
  impl.wake();
  if (impl.dispatcher.joinable()) impl.dispatcher.join();
  // Tasks queued but never dispatched (no dispatcher ran) are cancelled too.
  std::vector<Delivery> late;
  {
    std::lock_guard<std::mutex> lock(impl.mutex);
    for (TaskId id : impl.queue) {
      TaskResult result;
      result.message = kClosedMessage;
      impl.finish_locked(impl.tasks.at(id), std::move(result));
    }
    impl.queue.clear();
    late.swap(impl.deliveries);
  }
  for (auto& delivery : late) delivery.on_done(delivery.id, delivery.result);
}

}  // namespace gpuslot
