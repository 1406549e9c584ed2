// api/pool_dispatcher.hpp — the worker pool's state and its dispatcher. Internal to the api layer.
//
// Threads: callers (submit, wait, map, cancel, close; pool.cpp) only touch the queue and the
// results under `mutex`. One dispatcher thread owns the workers (pool_dispatcher.cpp): it takes
// leases, forks, writes tasks, reads results and reaps. It never holds `mutex` while it forks,
// waits for a lease, does socket I/O or runs a callback, so a caller that holds an interpreter
// lock (Python's GIL) while it takes `mutex` can never deadlock with a dispatcher that needs that
// interpreter lock to fork or to deliver a result. The dispatcher runs with every asynchronous
// signal blocked (signals go to the application's threads); workers get back the mask of the
// thread that created the pool.
#pragma once

#include <signal.h>
#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "api/pool_protocol.hpp"
#include "gpuslot/gpuslot.hpp"
#include "gpuslot/pool.hpp"

namespace gpuslot {

namespace pool_internal {

using Clock = std::chrono::steady_clock;

inline constexpr const char* kClosedMessage = "cancelled: the pool was closed";

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

struct Delivery {
  WorkerPool::TaskId id;
  WorkerPool::Callback on_done;
  TaskResult result;
};

}  // namespace pool_internal

struct WorkerPool::Impl {
  using Clock = pool_internal::Clock;
  using Task = pool_internal::Task;
  using Worker = pool_internal::Worker;
  using Delivery = pool_internal::Delivery;
  using Frame = pool_protocol::Frame;

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
  std::thread::id dispatcher_id;  // set (under `mutex`) when it starts; stays after a detach
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

  ~Impl();

  // --- shared state (pool.cpp) ---
  void wake() const;
  // Records a task's result for wait() or its callback; call with `mutex` held.
  void finish_locked(Task& task, TaskResult result);
  // Runs the callbacks of finished tasks, outside `mutex`.
  void deliver();
  bool has_queued() const;
  bool closing_now() const;
  bool failed() const;

  // --- the dispatcher's (pool_dispatcher.cpp) ---
  void publish_workers();
  // Stops every worker and fails every task with `error` (from then on submit returns it).
  void fail(Error error, bool in_init);
  void stop_all_workers();
  std::vector<int> pool_descriptors() const;
  // Forks the worker of `slot` on its leased GPU. False (with the pool failed) when fork fails.
  bool spawn(std::size_t slot);
  // How many workers: `workers`, or one per visible GPU. False when the pool failed.
  bool decide_target();
  // Reserves a GPU for one more worker and starts it. `block`: wait for room (no worker runs).
  void grow(bool block);
  void start_worker(GpuLease lease);
  // A requeued task goes to a GPU where it has not failed, unless no live worker offers one.
  std::optional<TaskId> pick_locked(const Worker& worker);
  void dispatch();
  // An attempt of the worker's task failed (out of memory, or the worker died): requeue it at the
  // front, or give up after `retries` requeues. `retry` false: the failure is final (`message`).
  void attempt_failed(Worker& worker, const std::string& why, const std::string& message, std::string payload, bool retry);
  // The worker's task will not finish: the pool is closing.
  void cancel_running(Worker& worker);
  // Ends the task `worker` is running (if it still exists) with `result`; the worker is free.
  void finish_running(Worker& worker, TaskResult result);
  void handle_frame(std::size_t slot, Frame frame);
  // Reaps a worker whose socket closed; returns how it ended.
  std::string reap(Worker& worker);
  // Removes a worker and gives its GPU back.
  void retire(std::size_t slot);
  void worker_died(std::size_t slot);
  // Waits for frames, deaths or a wake-up; at most `timeout`.
  void poll_workers(std::chrono::milliseconds timeout);
  // The dispatcher thread's body, until close().
  void run();
  // End of input to every worker, `grace` to finish the running task, then SIGKILL.
  void shut_down();
};

}  // namespace gpuslot
