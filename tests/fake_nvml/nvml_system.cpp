// nvml_system.cpp — library lifetime and system-wide queries of the fake NVML.
//
// Init mirrors the real library's contract (nvml-abi.md §2): reference counted, and failing
// with the codes a broken installation gives, so gpuslot's "NVML unavailable" paths are tested:
//   GPUSLOT_FAKE_NVML_HOST unset          → DRIVER_NOT_LOADED (the "no driver" machine; silent)
//   host file missing or unreadable       → DRIVER_NOT_LOADED, one line on stderr
//   host file malformed                   → UNKNOWN, one line on stderr naming file and error
//   host file has "init_error": N         → N (e.g. 9 DRIVER_NOT_LOADED, 18 version mismatch)
#include <cstdio>

#include "nvml_session.h"

using fake_nvml::Call;
using fake_nvml::guarded;
using fake_nvml::Host;

namespace {

// CUDA 12.4, reported by the v1 call when the host file names none: the real v1 call "returns a
// known supported version number" when it cannot ask libcuda.
constexpr int kFallbackCudaDriverVersion = 12040;

nvmlReturn_t initialize() noexcept {
  return guarded([]() -> nvmlReturn_t {
    Call call;
    const Host* host = nullptr;
    std::string error;
    const nvmlReturn_t rc = call.host(host, &error);
    if (rc == NVML_ERROR_DRIVER_NOT_LOADED && !Call::host_path().empty()) {
      std::fprintf(stderr, "%s\n", error.c_str());  // malformed files are reported by the cache
    }
    if (rc != NVML_SUCCESS) return rc;
    if (host->init_error && *host->init_error != NVML_SUCCESS) return *host->init_error;
    ++call.init_count();
    return NVML_SUCCESS;
  });
}

}  // namespace

extern "C" {

nvmlReturn_t nvmlInit_v2(void) { return initialize(); }

// The legacy name; PyTorch's NVML probe calls it (nvml-abi.md §7).
nvmlReturn_t nvmlInit(void) { return initialize(); }

// pynvml's nvmlInit() calls this with 0. The flags change nothing here: a host file with no GPUs
// already initialises successfully (what NVML_INIT_FLAG_NO_GPUS asks for).
nvmlReturn_t nvmlInitWithFlags(unsigned int /*flags*/) { return initialize(); }

// More shutdowns than inits answer UNINITIALIZED, as NVIDIA's own DCGM fake does.
nvmlReturn_t nvmlShutdown(void) {
  return guarded([]() -> nvmlReturn_t {
    Call call;
    if (!call.initialized()) return NVML_ERROR_UNINITIALIZED;
    --call.init_count();
    return NVML_SUCCESS;
  });
}

// NVIDIA's texts (nvml-abi.md §6); usable before init, like the real one.
const char* nvmlErrorString(nvmlReturn_t result) {
  switch (result) {
    case 0: return "Success";
    case 1: return "Uninitialized";
    case 2: return "Invalid Argument";
    case 3: return "Not Supported";
    case 4: return "Insufficient Permissions";
    case 5: return "Already Initialized";
    case 6: return "Not Found";
    case 7: return "Insufficient Size";
    case 8: return "Insufficient External Power";
    case 9: return "Driver Not Loaded";
    case 10: return "Timeout";
    case 11: return "Interrupt Request Issue";
    case 12: return "NVML Shared Library Not Found";
    case 13: return "Function Not Found";
    case 14: return "Corrupted infoROM";
    case 15: return "GPU is lost";
    case 16: return "GPU requires reset";
    case 17: return "GPU access blocked by the operating system";
    case 18: return "Driver/library version mismatch";
    case 19: return "In use by another client";
    case 20: return "Insufficient Memory";
    case 23: return "Insufficient Resources";
    default: return "Unknown Error";
  }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char* version, unsigned int length) {
  return guarded([&]() -> nvmlReturn_t {
    Call call;
    if (!call.initialized()) return NVML_ERROR_UNINITIALIZED;
    if (!version) return NVML_ERROR_INVALID_ARGUMENT;
    const Host* host = nullptr;
    if (const nvmlReturn_t rc = call.host(host); rc != NVML_SUCCESS) return rc;
    return fake_nvml::copy_string(host->driver_version, version, length);
  });
}

// "<CUDA major>.<driver version>", e.g. "12.550.54.15". Documented to work before init, so it
// falls back to a fixed value when there is no readable host.
nvmlReturn_t nvmlSystemGetNVMLVersion(char* version, unsigned int length) {
  return guarded([&]() -> nvmlReturn_t {
    Call call;
    std::string text = "12.550.54.15";
    const Host* host = nullptr;
    if (call.host(host) == NVML_SUCCESS) {
      text = std::to_string(host->cuda_driver_version.value_or(kFallbackCudaDriverVersion) / 1000) + "." +
             host->driver_version;
    }
    return fake_nvml::copy_string(text, version, length);
  });
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion(int* cudaDriverVersion) {
  return guarded([&]() -> nvmlReturn_t {
    Call call;
    if (!call.initialized()) return NVML_ERROR_UNINITIALIZED;
    if (!cudaDriverVersion) return NVML_ERROR_INVALID_ARGUMENT;
    const Host* host = nullptr;
    if (const nvmlReturn_t rc = call.host(host); rc != NVML_SUCCESS) return rc;
    *cudaDriverVersion = host->cuda_driver_version.value_or(kFallbackCudaDriverVersion);
    return NVML_SUCCESS;
  });
}

// _v2 asks libcuda; with no "cuda_driver_version" in the host file it behaves like a machine
// without libcuda.so.1: LIBRARY_NOT_FOUND.
nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int* cudaDriverVersion) {
  return guarded([&]() -> nvmlReturn_t {
    Call call;
    if (!call.initialized()) return NVML_ERROR_UNINITIALIZED;
    if (!cudaDriverVersion) return NVML_ERROR_INVALID_ARGUMENT;
    const Host* host = nullptr;
    if (const nvmlReturn_t rc = call.host(host); rc != NVML_SUCCESS) return rc;
    if (!host->cuda_driver_version) return NVML_ERROR_LIBRARY_NOT_FOUND;
    *cudaDriverVersion = *host->cuda_driver_version;
    return NVML_SUCCESS;
  });
}

}  // extern "C"
