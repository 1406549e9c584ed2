// gpuslot/pool.hpp — one persistent worker process per GPU, fed from one shared queue.
//
// The seed's chunked ASR: a model is loaded once per GPU and the chunks of a long job are spread
// over those GPUs. Loading is the expensive part, so workers are persistent: each is a forked
// process that runs `init` once on its GPU, then `work` for task after task.
//
// What the pool guarantees:
// - Memory first. Before a worker starts, `memory_bytes` is reserved on its GPU through the
//   host-wide ledger (the same leases as `gpuslot run`), held by this process for the worker's
//   life and released when the pool closes. GPUs without the room are skipped; when no worker
//   can start at all the pool waits for room (FIFO-fair with every other waiter), unless told
//   not to. Workers the host has no room for yet are started as soon as room appears.
// - Nothing is lost. A task whose attempt fails with GPU out of memory (the failure text matches
//   looks_like_out_of_memory) or whose worker dies (killed, crashed) is put back at the front of
//   the queue and tried on another worker's GPU first, at most `retries` times; after that it is
//   reported failed with every attempt's reason. Any other failure is reported at once (it would
//   fail again). A dead worker is replaced on the same GPU, keeping the lease.
// - Order. map() returns results in submission order whatever order they finished in.
//
// Processes: workers are fork()ed from a dispatcher thread the pool owns (started on the first
// task). A worker ignores SIGINT (the parent decides), is SIGKILLed by the kernel if the pool's
// process dies (PR_SET_PDEATHSIG), and inherits no lease file or lock of the parent. The parent's
// environment is never changed; each worker gets its GPU as "cuda:N" inside the parent's
// visibility — it does not set CUDA_VISIBLE_DEVICES — so `init` should make that the current
// device (torch.cuda.set_device(device)). As with any forked worker, the parent must not have
// initialised CUDA itself before the pool starts.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "gpuslot/error.hpp"
#include "gpuslot/policy.hpp"
#include "gpuslot/units.hpp"

namespace gpuslot {

// The GPU a worker runs on.
struct WorkerDevice {
  unsigned worker = 0;        // the worker's number in this pool, from 0
  std::string device;         // "cuda:N" inside the parent's visibility
  unsigned cuda_ordinal = 0;
  unsigned nvml_index = 0;    // nvidia-smi's numbering
  std::string uuid;
};

// What `init` or `work` returns in the worker.
struct TaskOutcome {
  bool ok = true;
  std::string payload;   // ok: the result bytes; failed: bytes for the caller (e.g. a pickled exception)
  std::string message;   // failed: "RuntimeError: CUDA out of memory. Tried to allocate …"

  static TaskOutcome success(std::string payload) { return {true, std::move(payload), {}}; }
  static TaskOutcome failure(std::string message, std::string payload = {}) {
    return {false, std::move(payload), std::move(message)};
  }
};

// The code that runs in the workers. The functions are called only in worker processes, never in
// the process that owns the pool; they must not throw (an escaping exception is reported as a
// failure with its what()).
struct WorkerProgram {
  // Once per worker, before its first task: load the model on `device`. A failure that looks like
  // out of memory gives that GPU back and the pool tries again later, another GPU first; any
  // other failure stops the pool (every waiting task is reported failed with that message).
  std::function<TaskOutcome(const WorkerDevice& device)> init{};
  // One task: bytes in, result bytes out (or a failure).
  std::function<TaskOutcome(std::string_view payload)> work{};
  // Called in the worker just before it exits (e.g. to flush buffered output). Optional.
  std::function<void()> before_exit{};
  // Creates a worker process with the semantics of fork(): 0 in the child, the child's pid in
  // the parent, -1 with errno on failure. Default: ::fork(). An interpreter that must prepare
  // for fork (Python: PyOS_BeforeFork / PyOS_AfterFork_Child) supplies its own.
  std::function<pid_t()> fork_process{};
};

struct PoolOptions {
  std::uint64_t memory_bytes = 4 * kGiB;  // reserved on each worker's GPU before it starts
  std::optional<unsigned> workers{};        // how many workers (one per GPU); nullopt: every visible GPU
  unsigned retries = 3;                   // requeues of a task after out of memory or worker death
  Strategy strategy = Strategy::most_free;
  std::vector<std::string> exclude{};       // GPUs never to use: NVML indices or UUIDs
  bool wait = true;                       // wait for room when no worker can start (else nothing_fits)
  std::optional<std::chrono::milliseconds> wait_timeout{};  // Errc::timeout after waiting this long
  std::string command{};                    // shown by `gpuslot leases`; default: "WorkerPool: <command line>"
};

struct TaskResult {
  enum class Status { succeeded, failed, cancelled };
  Status status = Status::cancelled;
  std::string payload;               // the result, or the last failed attempt's payload
  std::string message;               // why it failed or was cancelled (last attempt)
  unsigned attempts = 0;             // attempts started
  std::vector<std::string> history;  // one line per failed attempt: "cuda:1 (GPU 1, worker 1): out of memory: …"
  std::optional<WorkerDevice> device;  // where the last attempt ran

  bool ok() const { return status == Status::succeeded; }
};

// A worker as the pool sees it now.
struct WorkerInfo {
  WorkerDevice device;
  pid_t pid = 0;                 // 0 while it is being replaced
  std::string state;             // "starting", "idle", "busy", "stopped"
  std::size_t tasks_done = 0;
  std::string lease_id;
};

class WorkerPool {
 public:
  using TaskId = std::uint64_t;
  using Callback = std::function<void(TaskId, const TaskResult&)>;

  // Validates the options (Errc::bad_input); no process is started until the first task.
  static Result<std::unique_ptr<WorkerPool>> create(PoolOptions options, WorkerProgram program);
  ~WorkerPool();  // close()
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  // Queues one task. With `on_done`, the result is delivered to it (on the pool's dispatcher
  // thread, never under a pool lock) instead of to wait(). Errc::state after close(); the pool's
  // own error (failure()) once it has failed.
  Result<TaskId> submit(std::string payload, Callback on_done = {});

  // The result of a task submitted without a callback, once it is done (then forgotten).
  // nullopt when `timeout` passed first. Errc::bad_input for an unknown or already taken id.
  Result<std::optional<TaskResult>> wait(TaskId id, std::optional<std::chrono::milliseconds> timeout = std::nullopt);

  // Submits every payload and waits for all: results in submission order. Fails only when the
  // pool itself fails (no GPU, NVML gone, a worker's init failed): then the error.
  Result<std::vector<TaskResult>> map(std::vector<std::string> payloads);

  // Drops queued tasks among `ids` (reported cancelled); running ones finish.
  void cancel(const std::vector<TaskId>& ids);

  std::vector<WorkerInfo> workers() const;

  // The error that stopped the pool, if one did; failed_in_worker_init() tells whether it was a
  // worker's init that failed (the message then carries init's own failure text).
  std::optional<Error> failure() const;
  bool failed_in_worker_init() const;

  // Stops the pool: queued tasks are cancelled, workers get end-of-input and up to `grace` to
  // finish the task they run, then SIGKILL; leases are released. Idempotent. Called from a
  // result callback (the pool's own thread), it starts the stop and returns: that thread
  // finishes it once the callback is over, even when the pool itself is destroyed meanwhile.
  void close(std::chrono::milliseconds grace = std::chrono::milliseconds(2000));

  struct Impl;

 private:
  explicit WorkerPool(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;  // shared with the dispatcher thread, which may outlive this object
};

}  // namespace gpuslot
