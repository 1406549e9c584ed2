// pool_dispatcher.cpp — the worker pool's dispatcher thread: leases per worker, forking,
// dispatch, requeue on out of memory or a worker's death, shutdown. The worker side is
// pool_worker.cpp; the callers' side pool.cpp; the threads' rules pool_dispatcher.hpp.
#include "api/pool_dispatcher.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "api/pool_worker.hpp"
#include "api/session.hpp"

namespace gpuslot {

using pool_internal::kClosedMessage;
using pool_protocol::FrameKind;
using Worker = pool_internal::Worker;
using Clock = pool_internal::Clock;

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

const char* state_name(Worker::State state) {
  switch (state) {
    case Worker::State::starting: return "starting";
    case Worker::State::idle: return "idle";
    case Worker::State::busy: return "busy";
  }
  return "?";
}

}  // namespace

void WorkerPool::Impl::fail(Error error, bool in_init) {
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

void WorkerPool::Impl::stop_all_workers() {
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

std::vector<int> WorkerPool::Impl::pool_descriptors() const {
  std::vector<int> fds{wake_fd};
  for (const auto& worker : workers) fds.push_back(worker.fd);
  return fds;
}

bool WorkerPool::Impl::spawn(std::size_t slot) {
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

bool WorkerPool::Impl::decide_target() {
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
  // Inside a Slurm job: the GPUs it was granted.
  const auto visible = unsigned(visibility.candidates().size());
  if (visible == 0) {
    fail(make_error(Errc::nothing_fits, snapshot->gpus.empty()        ? std::string("no NVIDIA GPU on this host")
                                        : visibility.visible.empty() ? "no GPU is visible to this process (CUDA_VISIBLE_DEVICES)"
                                        : visibility.slurm           ? visibility.slurm->label() + " was granted no GPU"
                                                                     : "no GPU is usable"),
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

void WorkerPool::Impl::grow(bool block) {
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

void WorkerPool::Impl::start_worker(GpuLease lease) {
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

std::optional<WorkerPool::TaskId> WorkerPool::Impl::pick_locked(const Worker& worker) {
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

void WorkerPool::Impl::dispatch() {
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

void WorkerPool::Impl::attempt_failed(Worker& worker, const std::string& why, const std::string& message, std::string payload, bool retry) {
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

void WorkerPool::Impl::finish_running(Worker& worker, TaskResult result) {
  if (!worker.task) return;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = tasks.find(*worker.task);
  worker.task.reset();
  if (it == tasks.end()) return;
  finish_locked(it->second, std::move(result));
}

void WorkerPool::Impl::cancel_running(Worker& worker) {
  TaskResult result;
  result.status = TaskResult::Status::cancelled;
  result.message = kClosedMessage;
  finish_running(worker, std::move(result));
}

void WorkerPool::Impl::handle_frame(std::size_t slot, Frame frame) {
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
      TaskResult result;
      result.status = TaskResult::Status::succeeded;
      result.payload = std::move(frame.payload);
      finish_running(worker, std::move(result));
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

std::string WorkerPool::Impl::reap(Worker& worker) {
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

void WorkerPool::Impl::retire(std::size_t slot) {
  Worker& worker = workers[slot];
  if (worker.pid > 0) reap(worker);
  if (worker.lease) worker.lease->release();
  workers.erase(workers.begin() + std::ptrdiff_t(slot));
}

void WorkerPool::Impl::worker_died(std::size_t slot) {
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

void WorkerPool::Impl::poll_workers(std::chrono::milliseconds timeout) {
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

void WorkerPool::Impl::run() {
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

void WorkerPool::Impl::shut_down() {
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
void WorkerPool::Impl::publish_workers() {
  std::vector<WorkerInfo> info;
  for (const auto& worker : workers) {
    info.push_back({worker.device, worker.pid, state_name(worker.state), worker.done, worker.lease ? worker.lease->id() : ""});
  }
  std::lock_guard<std::mutex> lock(mutex);
  worker_info = std::move(info);
}

}  // namespace gpuslot
