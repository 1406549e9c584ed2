// nvml_session.h — the state behind the exported NVML calls, and the checks every call shares.
//
// NVML is callable from any thread, so each call holds one process-wide mutex from start to
// finish; calls are a stat() or two and a lookup, so contention is not a concern. The host file
// named by GPUSLOT_FAKE_NVML_HOST is looked up on every call (tests switch files in-process and
// rewrite them live); HostCache makes that a stat() unless the file changed, and no stat() at
// all within kLibraryRecheckNs (1 ms) of the last one.
#pragma once

#include <cstring>
#include <exception>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <vector>

#include "allocations.h"
#include "host_file.h"
#include "nvml_exports.h"

namespace fake_nvml {

// One call's exclusive view of the session: constructing it takes the lock.
class Call {
 public:
  Call();
  Call(const Call&) = delete;
  Call& operator=(const Call&) = delete;

  int& init_count();
  bool initialized() { return init_count() > 0; }

  // The host file's path, or empty when GPUSLOT_FAKE_NVML_HOST is unset or empty.
  static std::string host_path();

  // The current host. NVML_SUCCESS with `host` set; DRIVER_NOT_LOADED when the variable is unset
  // or the file unreadable (as if the driver had gone); UNKNOWN when the file is malformed.
  nvmlReturn_t host(const Host*& host, std::string* error = nullptr);

  // Live allocations on the GPU with this UUID (holders checked on every call, since a process
  // can die without the file changing).
  std::vector<Allocation> live_allocations(const std::string& uuid);

 private:
  std::unique_lock<std::mutex> lock_;
};

// Handles are addresses inside a static table, one slot per possible NVML index: non-NULL,
// stable for the life of the process, and decodable without trusting the pointer.
nvmlDevice_t handle_of(unsigned int index);
std::optional<unsigned int> index_of(nvmlDevice_t handle);

// Runs `body` and turns any exception into an NVML code: nothing may unwind into a C caller.
template <class Body>
nvmlReturn_t guarded(Body&& body) noexcept {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return NVML_ERROR_MEMORY;
  } catch (...) {
    return NVML_ERROR_UNKNOWN;
  }
}

// The preamble of every per-device call, in the order NVML reports problems: not initialised,
// a bad handle or a NULL output, the host unreadable, then the GPU lost. A handle whose index no
// longer exists because the host file shrank is a GPU that fell off the bus: GPU_IS_LOST.
// `body(call, gpu, index)` runs under the session lock.
template <class Body>
nvmlReturn_t on_device(nvmlDevice_t handle, bool outputs_present, Body&& body) noexcept {
  return guarded([&]() -> nvmlReturn_t {
    Call call;
    if (!call.initialized()) return NVML_ERROR_UNINITIALIZED;
    const auto index = index_of(handle);
    if (!index || !outputs_present) return NVML_ERROR_INVALID_ARGUMENT;
    const Host* host = nullptr;
    if (const nvmlReturn_t rc = call.host(host); rc != NVML_SUCCESS) return rc;
    if (*index >= host->gpus.size()) return NVML_ERROR_GPU_IS_LOST;
    const HostGpu& gpu = host->gpus[*index];
    if (gpu.lost) return NVML_ERROR_GPU_IS_LOST;
    return body(call, gpu, *index);
  });
}

// NVML's string getters: NULL → INVALID_ARGUMENT; `length` (which counts the NUL) too small →
// INSUFFICIENT_SIZE with the buffer untouched.
inline nvmlReturn_t copy_string(const std::string& value, char* buffer, unsigned int length) {
  if (!buffer) return NVML_ERROR_INVALID_ARGUMENT;
  if (value.size() + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
  std::memcpy(buffer, value.c_str(), value.size() + 1);
  return NVML_SUCCESS;
}

}  // namespace fake_nvml
