// gpuslot/gpuslot.hpp — gpuslot as a library: the small API a program uses to take a snapshot,
// resolve its device setting, pick a GPU and hold a lease on it, with the same semantics as the
// `gpuslot` command (DESIGN.md). The worker pool is in gpuslot/pool.hpp.
//
//   find_package(gpuslot REQUIRED)                     # or: pkg-config --cflags --libs gpuslot
//   target_link_libraries(app PRIVATE gpuslot::gpuslot)
//
//   #include <gpuslot/gpuslot.hpp>
//   auto lease = gpuslot::acquire_lease({.memory_bytes = 8 * gpuslot::kGiB});
//   if (!lease) { std::cerr << lease.error().message << "\n"; return gpuslot::exit_code_of(lease.error().code); }
//   load_model_on(lease->cuda_ordinals().front());      // "cuda:N" inside this process's visibility
//
// How the process reaches the GPUs, exactly as the command does: NVML is dlopen'ed at first use
// from GPUSLOT_NVML_LIBRARY, else libnvidia-ml.so.1 (nothing is linked at build time); leases live
// in GPUSLOT_STATE_DIR, else /run/gpuslot when an administrator made it, else /tmp/gpuslot;
// visibility is this process's CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER, read at each call.
// The library never sets an environment variable of its own process (threads share it): it hands
// back CUDA ordinals for in-process use.
//
// Errors: every function returns Result<T> (gpuslot/error.hpp) and never throws; Errc says what
// kind of failure it is (nothing_fits, bad_input, nvml_unavailable, state, timeout, …) and
// `message` is one line saying what was wrong and what is accepted. All functions may be called
// from any thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "gpuslot/error.hpp"
#include "gpuslot/inventory.hpp"
#include "gpuslot/lease.hpp"
#include "gpuslot/nvml.hpp"
#include "gpuslot/policy.hpp"
#include "gpuslot/units.hpp"
#include "gpuslot/visibility.hpp"

namespace gpuslot {

// The version of this library ("0.1.0").
const char* library_version() noexcept;

// One reading of every GPU (NVML opened once per process). Errc::nvml_unavailable when there is
// no NVIDIA driver (or GPUSLOT_NVML_LIBRARY names no usable library).
Result<Snapshot> read_snapshot();

// Which GPUs this process would see, and as which CUDA ordinals, under its current
// CUDA_VISIBLE_DEVICES / CUDA_DEVICE_ORDER (see gpuslot/visibility.hpp).
Visibility current_visibility(const Snapshot& snapshot);

// `gpuslot status --json`, byte for byte the same document (DESIGN.md "status --json").
// Lease files that were skipped, or an unusable state directory, are reported in `warnings`.
Result<std::string> status_json(std::vector<std::string>* warnings = nullptr);

// Why a request was given the GPUs it got, or why nothing fits: filled by the calls below when
// a pointer is passed, on success and on failure alike.
struct Explanation {
  std::string summary;                // one line: "GPU 1 (most-free)" / "no GPU fits now: …"
  std::vector<std::string> gpu_lines; // one per GPU: "GPU 0 (NVIDIA …) = cuda:0: too little memory: …"
  std::vector<std::string> warnings;  // "GPU 3 has only 1.20 GiB available", skipped lease files
  bool waiting_cannot_help = false;   // nothing fits and never will (too big, too many GPUs)
};

// What to reserve, and where.
struct LeaseRequest {
  std::uint64_t memory_bytes = 0;    // on each GPU; 0 asks for no memory (any healthy GPU)
  unsigned gpus = 1;                 // how many GPUs
  std::vector<std::string> exclude{};  // never these: NVML indices ("3") or UUIDs / unique UUID prefixes
  Strategy strategy = Strategy::most_free;
  std::optional<unsigned> max_utilization{};  // percent; busier GPUs are passed over
  std::string device{};                // "" (any visible GPU) or a spec: cuda:N, GPU-<uuid>, cuda, auto
  bool wait = false;                 // wait (FIFO-fair with every other waiter) until it fits
  std::optional<std::chrono::milliseconds> timeout{};  // with wait: Errc::timeout after this long
  std::string command{};               // shown by `gpuslot leases`; default: this process's command line
  // With wait: called with the reason when the request first has to wait ("no GPU fits now: …").
  std::function<void(const std::string&)> on_pending{};
  // With wait: polled about every 100 ms; returning true abandons the wait (Errc::timeout,
  // "wait cancelled") and leaves the queue at once. This is how a caller makes a long wait
  // interruptible (Ctrl-C in Python). Called on the thread that called acquire_lease, as is
  // on_pending.
  std::function<bool()> cancelled{};
};

// A reservation of GPU memory this process holds. Released by its destructor or release(), and
// by the kernel when the process dies, however it dies. Moving transfers it. A forked child does
// not hold its parent's leases: the copy it inherits is dropped without releasing them.
class GpuLease {
 public:
  GpuLease(GpuLease&& other) noexcept;
  GpuLease& operator=(GpuLease&& other) noexcept;
  GpuLease(const GpuLease&) = delete;
  GpuLease& operator=(const GpuLease&) = delete;
  ~GpuLease();

  const std::string& id() const;                     // as `gpuslot leases` lists it
  const std::vector<unsigned>& nvml_indices() const;  // best first; nvidia-smi's numbering
  const std::vector<std::string>& uuids() const;     // same order
  // The CUDA ordinals of the same GPUs inside this process's visibility (same order): pass
  // cuda_ordinals()[0] to torch.device / cudaSetDevice. Empty when CUDA's numbering cannot be
  // known here (mixed GPU models without CUDA_DEVICE_ORDER=PCI_BUS_ID): use the UUIDs then.
  const std::vector<unsigned>& cuda_ordinals() const;
  std::uint64_t reserved_bytes() const;              // on each GPU
  bool held() const;

  // Gives the room back now (idempotent).
  void release();
  // Keeps the lease until this process exits (then the kernel drops it); the object is empty
  // afterwards. select_best_gpu and resolve_device use this for the life of the process.
  void hold_until_exit();

  struct State;
  explicit GpuLease(std::unique_ptr<State> state);

 private:
  std::unique_ptr<State> state_;
};

// Select-and-reserve as one atomic step under the host lock: the lease layer's guarantee that
// two processes never both take the last room on a GPU. Errc::nothing_fits when no GPU has the
// room now (and `wait` is false, or waiting cannot help), Errc::bad_input for a malformed
// request (unknown exclude entry, more GPUs than visible, device spec that does not exist).
Result<GpuLease> acquire_lease(const LeaseRequest& request, Explanation* explanation = nullptr);

// The seed's `select_best_gpu(min_free_memory_gb, exclude_gpus)`: the CUDA ordinal (inside this
// process's visibility) of the best GPU with `memory_bytes` available, reserving that memory for
// the life of this process, so a process started a second later sees it taken. `exclude` holds
// CUDA ordinals ("0") or UUIDs — the numbering this function returns. Errc::nothing_fits (with
// the per-GPU reasons in `explanation`) when none fits.
struct SelectRequest {
  std::uint64_t memory_bytes = 8 * kGiB;
  std::vector<std::string> exclude{};
  Strategy strategy = Strategy::most_free;
  std::string command{};  // default: "select_best_gpu: <this process's command line>"
};
struct Selection {
  unsigned cuda_ordinal = 0;
  unsigned nvml_index = 0;
  std::string uuid;
  std::string lease_id;  // empty when memory_bytes is 0 (nothing to reserve)
};
Result<Selection> select_best_gpu(const SelectRequest& request, Explanation* explanation = nullptr);

// A service's device setting (`…_DEVICE=auto|cuda|cuda:N|cpu|GPU-<uuid>`) resolved to what it
// passes its framework: "cuda:N" (inside this process's visibility) or "cpu" — the semantics of
// `gpuslot device`:
//   auto    a GPU when the driver is there and one is visible, else "cpu"; GPUs present but
//           none with the room is Errc::nothing_fits, never a silent cpu;
//   cuda    a GPU is required (Errc::nvml_unavailable without one);
//   cuda:N  that ordinal, which must exist (Errc::bad_input) and have the room;
//   GPU-…   that GPU, which must be visible;
//   cpu     "cpu", without touching NVML.
// With memory_bytes > 0 a GPU result also reserves that memory for the life of this process
// (the CLI command, which exits at once, cannot; an in-process caller can and should).
struct DeviceRequest {
  std::optional<std::string> spec{};           // nullopt: read the variable `env`, else "auto"
  std::string env = "GPUSLOT_DEVICE";
  std::uint64_t memory_bytes = 0;
  Strategy strategy = Strategy::most_free;
  std::string command{};  // default: "resolve_device: <this process's command line>"
  // Called with each line `gpuslot device` prints on stderr, in its order, as it is decided (also
  // when the call fails: the GPUs' memory lines come before the error); `warning` marks the lines
  // the command prints as warnings. Optional.
  std::function<void(const std::string& line, bool warning)> on_log{};
};
struct DeviceResolution {
  std::string device;                    // "cuda:N" or "cpu"
  std::optional<unsigned> nvml_index;    // of the GPU, when device is cuda:N
  std::optional<std::string> uuid;
  std::string lease_id;                  // when memory was reserved
  std::vector<std::string> log;          // the lines `gpuslot device` prints on stderr (not its warnings)
};
Result<DeviceResolution> resolve_device(const DeviceRequest& request, Explanation* explanation = nullptr);

// Releases every lease this process keeps until exit (select_best_gpu, resolve_device,
// GpuLease::hold_until_exit). Returns how many were released.
std::size_t release_held_leases();

// True when `text` (an exception's type and message, or a job's output) carries one of the GPU
// out-of-memory signatures of DESIGN.md: "CUDA out of memory", "CUDA_ERROR_OUT_OF_MEMORY",
// "cudaErrorMemoryAllocation", "OutOfMemoryError".
bool looks_like_out_of_memory(std::string_view text);

}  // namespace gpuslot
