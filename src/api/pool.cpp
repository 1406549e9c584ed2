// pool.cpp — the worker pool's public face: what callers do (submit, wait, map, cancel, close)
// and the results they share with the dispatcher (pool_dispatcher.cpp), under the pool's mutex.
#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "api/pool_dispatcher.hpp"
#include "api/session.hpp"

namespace gpuslot {

using pool_internal::Delivery;
using pool_internal::kClosedMessage;
using pool_internal::Task;

WorkerPool::Impl::~Impl() {
  if (wake_fd >= 0) ::close(wake_fd);
}

void WorkerPool::Impl::wake() const {
  const std::uint64_t one = 1;
  if (wake_fd < 0) return;
  [[maybe_unused]] const ssize_t written = ::write(wake_fd, &one, sizeof one);
}

void WorkerPool::Impl::finish_locked(Task& task, TaskResult result) {
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

void WorkerPool::Impl::deliver() {
  std::vector<Delivery> ready;
  {
    std::lock_guard<std::mutex> lock(mutex);
    ready.swap(deliveries);
  }
  for (auto& delivery : ready) delivery.on_done(delivery.id, delivery.result);
}

bool WorkerPool::Impl::has_queued() const {
  std::lock_guard<std::mutex> lock(mutex);
  return !queue.empty();
}

bool WorkerPool::Impl::closing_now() const {
  std::lock_guard<std::mutex> lock(mutex);
  return closing;
}

bool WorkerPool::Impl::failed() const {
  std::lock_guard<std::mutex> lock(mutex);
  return failure.has_value();
}
// ----- the public face -----


WorkerPool::WorkerPool(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

WorkerPool::~WorkerPool() {
  close();
  // Destroyed in a result callback: the dispatcher thread is this one, and it finishes the stop
  // once the callback returns, keeping the state alive (see submit); nobody is left to join it.
  Impl& impl = *impl_;
  if (std::this_thread::get_id() == impl.dispatcher_id && impl.dispatcher.joinable()) impl.dispatcher.detach();
}

Result<std::unique_ptr<WorkerPool>> WorkerPool::create(PoolOptions options, WorkerProgram program) {
  if (!program.work) return make_error(Errc::bad_input, "a worker pool needs a work function");
  if (options.workers && (*options.workers == 0 || *options.workers > 1024)) {
    return make_error(Errc::bad_input, "invalid number of workers " + std::to_string(*options.workers) + ": expected 1 to 1024");
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
  auto impl = std::make_shared<Impl>();
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
    if (impl.closing) return make_error(Errc::bad_input, "the worker pool is closed; make a new one to run more tasks");
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
      // The thread keeps the pool's state alive: a result callback may destroy the pool.
      impl.dispatcher = std::thread([keep = impl_] { keep->run(); });
      impl.dispatcher_id = impl.dispatcher.get_id();
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
  if (std::this_thread::get_id() == impl.dispatcher_id) {
    // The thread that would deliver the result is this one, busy in a result callback.
    return make_error(Errc::bad_input, "a worker pool cannot be waited for from its own result callback");
  }
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
  bool on_dispatcher = false;
  {
    std::lock_guard<std::mutex> lock(impl.mutex);
    if (!impl.closing) {
      impl.closing = true;
      impl.grace = grace;
    }
    impl.stop = true;
    on_dispatcher = std::this_thread::get_id() == impl.dispatcher_id;
  }
  impl.wake();
  // In a result callback: the dispatcher (this thread) stops once the callback returns; a later
  // close() from another thread joins it as usual.
  if (on_dispatcher) return;
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
