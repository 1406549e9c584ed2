// nvml_library.cpp — the NVML loader.
//
// Why it looks like this:
// - dlopen at run time, never a link dependency: gpuslot must start (and say "no NVIDIA driver,
//   using cpu") on machines without the driver, and must load the fake library in tests through
//   this very code path.
// - Every entry point comes from nvml_entry_points.def; the struct of function pointers, the
//   resolution loop and the "missing required symbol" message are generated from it, so adding a
//   call is one line there (the lesson of nvtop's 150 lines of dlsym boilerplate).
// - Versioned symbols are bound newest first; a slot's alternatives share one C signature.
// - nvmlInit once per process (NVIDIA's mig-parted lost 4.7x CPU to init/shutdown churn). The
//   library stays loaded until exit: unloading NVML under running threads buys nothing.
#include "gpuslot/nvml.hpp"

#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

#include "nvml/nvml_abi.h"

namespace gpuslot {

struct NvmlLibrary::Impl {
  std::string path;
  void* dl = nullptr;
#define GPUSLOT_NVML_SLOT(slot, signature, required) \
  using slot##_fn = signature;                       \
  slot##_fn* slot = nullptr;                         \
  const char* slot##_symbol = nullptr;
#define GPUSLOT_NVML_SYMBOL(slot, symbol)
#include "nvml/nvml_entry_points.def"
#undef GPUSLOT_NVML_SLOT
#undef GPUSLOT_NVML_SYMBOL

  // Binds every slot; returns the name of the first required slot left unbound, or "".
  std::string bind() {
#define GPUSLOT_NVML_SLOT(slot, signature, required)
#define GPUSLOT_NVML_SYMBOL(slot, symbol)                                        \
  if (slot == nullptr) {                                                         \
    if (void* address = dlsym(dl, #symbol)) {                                    \
      slot = reinterpret_cast<slot##_fn*>(address);                              \
      slot##_symbol = #symbol;                                                   \
    }                                                                            \
  }
#include "nvml/nvml_entry_points.def"
#undef GPUSLOT_NVML_SLOT
#undef GPUSLOT_NVML_SYMBOL
#define GPUSLOT_NVML_SLOT(slot, signature, required) \
  if ((required) && slot == nullptr) return #slot;
#define GPUSLOT_NVML_SYMBOL(slot, symbol)
#include "nvml/nvml_entry_points.def"
#undef GPUSLOT_NVML_SLOT
#undef GPUSLOT_NVML_SYMBOL
    return {};
  }

  // "GPU is lost (NVML error 15 in nvmlDeviceGetMemoryInfo_v2)"
  Error error(nvmlReturn_t code, const char* function) const {
    const char* text = error_string != nullptr ? error_string(code) : nullptr;
    std::string message = text != nullptr && *text != '\0' ? text : "Unknown Error";
    message += " (NVML error " + std::to_string(code) + " in " + function + ")";
    Error result{Errc::nvml_error, std::move(message)};
    result.nvml_code = code;
    return result;
  }

  nvmlDevice_t device(Handle handle) const { return static_cast<nvmlDevice_t>(handle); }
};

namespace {

std::mutex g_open_mutex;
std::map<std::string, std::weak_ptr<NvmlLibrary>>& open_libraries() {
  static std::map<std::string, std::weak_ptr<NvmlLibrary>> libraries;
  return libraries;
}

Error unavailable(std::string message) { return make_error(Errc::nvml_unavailable, std::move(message)); }

// NVML strings are NUL-terminated within the buffer; never trust that blindly.
std::string from_buffer(const char* buffer, std::size_t size) { return std::string(buffer, strnlen(buffer, size)); }

}  // namespace

NvmlLibrary::NvmlLibrary(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

NvmlLibrary::~NvmlLibrary() {
  // Deliberately no nvmlShutdown/dlclose: objects are shared for the process's life (see top).
}

const std::string& NvmlLibrary::path() const { return impl_->path; }

Result<std::shared_ptr<NvmlLibrary>> NvmlLibrary::open(const std::string& requested_path) {
  std::string path = requested_path;
  if (path.empty()) {
    const char* from_env = std::getenv("GPUSLOT_NVML_LIBRARY");
    path = from_env != nullptr && *from_env != '\0' ? from_env : "libnvidia-ml.so.1";
  }
  std::lock_guard lock(g_open_mutex);
  auto& libraries = open_libraries();
  if (auto existing = libraries[path].lock()) return existing;

  auto impl = std::make_unique<Impl>();
  impl->path = path;
  // RTLD_LOCAL: NVML's symbols must not satisfy anyone else's references by accident.
  impl->dl = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (impl->dl == nullptr) {
    const char* why = dlerror();
    return unavailable("NVIDIA driver library not found: cannot load " + path + " (" +
                       (why != nullptr ? why : "unknown reason") +
                       "); install the NVIDIA driver or set GPUSLOT_NVML_LIBRARY to libnvidia-ml.so.1");
  }
  if (std::string missing = impl->bind(); !missing.empty()) {
    return unavailable(path + " lacks the NVML function needed for '" + missing +
                       "'; the driver is too old or the file is not NVML");
  }
  if (nvmlReturn_t code = impl->init(); code != NVML_SUCCESS) {
    Error error = impl->error(code, impl->init_symbol);
    error.code = Errc::nvml_unavailable;
    error.message = "NVML failed to initialise: " + error.message;
    return error;
  }
  auto library = std::shared_ptr<NvmlLibrary>(new NvmlLibrary(std::move(impl)));
  libraries[path] = library;
  return library;
}

Result<unsigned> NvmlLibrary::device_count() {
  unsigned count = 0;
  if (nvmlReturn_t code = impl_->device_get_count(&count); code != NVML_SUCCESS) {
    return impl_->error(code, impl_->device_get_count_symbol);
  }
  return count;
}

Result<NvmlLibrary::Handle> NvmlLibrary::handle(unsigned index) {
  nvmlDevice_t device = nullptr;
  if (nvmlReturn_t code = impl_->device_get_handle_by_index(index, &device); code != NVML_SUCCESS) {
    return impl_->error(code, impl_->device_get_handle_by_index_symbol);
  }
  return static_cast<Handle>(device);
}

std::optional<std::string> NvmlLibrary::driver_version() {
  if (impl_->system_get_driver_version == nullptr) return std::nullopt;
  char buffer[NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE] = {};
  if (impl_->system_get_driver_version(buffer, sizeof buffer) != NVML_SUCCESS) return std::nullopt;
  return from_buffer(buffer, sizeof buffer);
}

std::optional<int> NvmlLibrary::cuda_driver_version() {
  if (impl_->system_get_cuda_driver_version == nullptr) return std::nullopt;
  int version = 0;
  if (impl_->system_get_cuda_driver_version(&version) != NVML_SUCCESS) return std::nullopt;
  return version;
}

Result<std::string> NvmlLibrary::uuid(Handle device) {
  char buffer[NVML_DEVICE_UUID_V2_BUFFER_SIZE] = {};
  if (nvmlReturn_t code = impl_->device_get_uuid(impl_->device(device), buffer, sizeof buffer); code != NVML_SUCCESS) {
    return impl_->error(code, "nvmlDeviceGetUUID");
  }
  return from_buffer(buffer, sizeof buffer);
}

Result<std::string> NvmlLibrary::name(Handle device) {
  if (impl_->device_get_name == nullptr) return impl_->error(NVML_ERROR_FUNCTION_NOT_FOUND, "nvmlDeviceGetName");
  char buffer[NVML_DEVICE_NAME_V2_BUFFER_SIZE] = {};
  if (nvmlReturn_t code = impl_->device_get_name(impl_->device(device), buffer, sizeof buffer); code != NVML_SUCCESS) {
    return impl_->error(code, "nvmlDeviceGetName");
  }
  return from_buffer(buffer, sizeof buffer);
}

Result<std::string> NvmlLibrary::pci_bus_id(Handle device) {
  if (impl_->device_get_pci_info == nullptr) return impl_->error(NVML_ERROR_FUNCTION_NOT_FOUND, "nvmlDeviceGetPciInfo_v3");
  nvmlPciInfo_t pci{};
  if (nvmlReturn_t code = impl_->device_get_pci_info(impl_->device(device), &pci); code != NVML_SUCCESS) {
    return impl_->error(code, impl_->device_get_pci_info_symbol);
  }
  return from_buffer(pci.busId, sizeof pci.busId);
}

Result<unsigned> NvmlLibrary::minor_number(Handle device) {
  if (impl_->device_get_minor_number == nullptr) {
    return impl_->error(NVML_ERROR_FUNCTION_NOT_FOUND, "nvmlDeviceGetMinorNumber");
  }
  unsigned minor = 0;
  if (nvmlReturn_t code = impl_->device_get_minor_number(impl_->device(device), &minor); code != NVML_SUCCESS) {
    return impl_->error(code, "nvmlDeviceGetMinorNumber");
  }
  return minor;
}

Result<NvmlMemory> NvmlLibrary::memory(Handle device) {
  // v2 separates the driver's own reservation from "used"; drivers before 11.6 lack the symbol
  // and drivers that reject the version word answer FUNCTION_NOT_FOUND: then read v1.
  if (impl_->device_get_memory_info_v2 != nullptr) {
    nvmlMemory_v2_t memory{};
    memory.version = GPUSLOT_NVML_MEMORY_V2_VERSION;
    nvmlReturn_t code = impl_->device_get_memory_info_v2(impl_->device(device), &memory);
    if (code == NVML_SUCCESS) {
      return NvmlMemory{memory.total, memory.free, memory.used, memory.reserved};
    }
    if (code != NVML_ERROR_FUNCTION_NOT_FOUND && code != NVML_ERROR_NOT_SUPPORTED) {
      return impl_->error(code, "nvmlDeviceGetMemoryInfo_v2");
    }
  }
  nvmlMemory_t memory{};
  if (nvmlReturn_t code = impl_->device_get_memory_info(impl_->device(device), &memory); code != NVML_SUCCESS) {
    return impl_->error(code, "nvmlDeviceGetMemoryInfo");
  }
  return NvmlMemory{memory.total, memory.free, memory.used, std::nullopt};
}

Result<std::pair<unsigned, unsigned>> NvmlLibrary::utilization(Handle device) {
  if (impl_->device_get_utilization_rates == nullptr) {
    return impl_->error(NVML_ERROR_FUNCTION_NOT_FOUND, "nvmlDeviceGetUtilizationRates");
  }
  nvmlUtilization_t utilization{};
  if (nvmlReturn_t code = impl_->device_get_utilization_rates(impl_->device(device), &utilization); code != NVML_SUCCESS) {
    return impl_->error(code, "nvmlDeviceGetUtilizationRates");
  }
  return std::pair{utilization.gpu, utilization.memory};
}

Result<unsigned> NvmlLibrary::temperature_c(Handle device) {
  if (impl_->device_get_temperature == nullptr) return impl_->error(NVML_ERROR_FUNCTION_NOT_FOUND, "nvmlDeviceGetTemperature");
  unsigned temperature = 0;
  if (nvmlReturn_t code = impl_->device_get_temperature(impl_->device(device), NVML_TEMPERATURE_GPU, &temperature);
      code != NVML_SUCCESS) {
    return impl_->error(code, "nvmlDeviceGetTemperature");
  }
  return temperature;
}

Result<unsigned> NvmlLibrary::power_mw(Handle device) {
  if (impl_->device_get_power_usage == nullptr) return impl_->error(NVML_ERROR_FUNCTION_NOT_FOUND, "nvmlDeviceGetPowerUsage");
  unsigned power = 0;
  if (nvmlReturn_t code = impl_->device_get_power_usage(impl_->device(device), &power); code != NVML_SUCCESS) {
    return impl_->error(code, "nvmlDeviceGetPowerUsage");
  }
  return power;
}

namespace {

// Drives NVML's process-list convention: ask with *count = 0 (SUCCESS = none, INSUFFICIENT_SIZE
// = *count is the size needed), then read into a buffer with headroom, because processes can
// start between the two calls; retry a few times if the list keeps growing.
template <class Record, class Function>
nvmlReturn_t read_process_list(Function function, nvmlDevice_t device, std::vector<Record>& records) {
  unsigned count = 0;
  nvmlReturn_t code = function(device, &count, nullptr);
  if (code == NVML_SUCCESS) {
    records.clear();
    return NVML_SUCCESS;
  }
  for (int attempt = 0; attempt < 4 && code == NVML_ERROR_INSUFFICIENT_SIZE; ++attempt) {
    records.resize(count * 2 + 8);
    count = static_cast<unsigned>(records.size());
    code = function(device, &count, records.data());
    if (code == NVML_SUCCESS) records.resize(count);
  }
  return code;
}

std::optional<std::uint64_t> known_bytes(unsigned long long value) {
  if (value == GPUSLOT_NVML_VALUE_NOT_AVAILABLE) return std::nullopt;
  return value;
}

}  // namespace

Result<std::vector<NvmlProcess>> NvmlLibrary::compute_processes(Handle device) {
  std::vector<NvmlProcess> processes;
  if (impl_->device_get_compute_processes != nullptr) {
    std::vector<nvmlProcessInfo_v2_t> records;
    if (nvmlReturn_t code = read_process_list(impl_->device_get_compute_processes, impl_->device(device), records);
        code != NVML_SUCCESS) {
      return impl_->error(code, impl_->device_get_compute_processes_symbol);
    }
    for (const auto& record : records) processes.push_back({static_cast<pid_t>(record.pid), known_bytes(record.usedGpuMemory)});
    return processes;
  }
  if (impl_->device_get_compute_processes_v1 != nullptr) {
    std::vector<nvmlProcessInfo_v1_t> records;
    if (nvmlReturn_t code = read_process_list(impl_->device_get_compute_processes_v1, impl_->device(device), records);
        code != NVML_SUCCESS) {
      return impl_->error(code, "nvmlDeviceGetComputeRunningProcesses");
    }
    for (const auto& record : records) processes.push_back({static_cast<pid_t>(record.pid), known_bytes(record.usedGpuMemory)});
    return processes;
  }
  return impl_->error(NVML_ERROR_FUNCTION_NOT_FOUND, "nvmlDeviceGetComputeRunningProcesses");
}

}  // namespace gpuslot
