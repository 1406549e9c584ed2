// snapshot.cpp — one NVML pass over every GPU, into a plain value.
//
// A GPU is "unhealthy" when NVML cannot tell its memory (GPU_IS_LOST, or any other error on the
// memory call): gpuslot must not place work on a card whose room it cannot see. Optional readings
// (utilisation, temperature, power, name) that fail stay nullopt without marking the GPU
// unhealthy, since many boards simply do not support them (NOT_SUPPORTED).
#include <algorithm>

#include "gpuslot/inventory.hpp"
#include "gpuslot/nvml.hpp"

namespace gpuslot {

const GpuInfo* Snapshot::find_uuid(std::string_view uuid) const {
  for (const auto& gpu : gpus) {
    if (gpu.uuid == uuid) return &gpu;
  }
  return nullptr;
}

namespace {

void mark_unhealthy(GpuInfo& gpu, const Error& error) {
  if (gpu.healthy) {
    gpu.healthy = false;
    gpu.health_error = error.message;
  }
}

template <class T>
std::optional<T> optional_reading(Result<T> result, GpuInfo& gpu) {
  if (result) return std::move(result).value();
  // A lost GPU fails every call: that is a health problem, not a missing sensor.
  if (result.error().nvml_code == NvmlLibrary::kGpuIsLost) mark_unhealthy(gpu, result.error());
  return std::nullopt;
}

GpuInfo read_gpu(NvmlLibrary& nvml, unsigned index, bool with_processes) {
  GpuInfo gpu;
  gpu.nvml_index = index;
  auto handle = nvml.handle(index);
  if (!handle) {
    mark_unhealthy(gpu, handle.error());
    return gpu;
  }
  if (auto uuid = nvml.uuid(*handle)) gpu.uuid = std::move(uuid).value();
  else mark_unhealthy(gpu, uuid.error());
  gpu.name = optional_reading(nvml.name(*handle), gpu).value_or("");
  gpu.pci_bus_id = optional_reading(nvml.pci_bus_id(*handle), gpu).value_or("");
  gpu.minor_number = optional_reading(nvml.minor_number(*handle), gpu);

  // Processes first, memory second: a process in the list allocated before the memory reading,
  // so its bytes are inside "used". (The other order let a job that allocated in between be
  // credited to its lease without being subtracted from "free": a reservation counted zero.)
  if (with_processes) {
    if (auto processes = optional_reading(nvml.compute_processes(*handle), gpu)) {
      for (const auto& process : *processes) {
        GpuProcess entry;
        entry.pid = process.pid;
        entry.used_bytes = process.used_bytes;
        ProcessIdentity identity = identify_process(process.pid);
        entry.user = std::move(identity.user);
        entry.command = std::move(identity.command);
        gpu.processes.push_back(std::move(entry));
      }
    }
  }
  if (auto memory = nvml.memory(*handle)) {
    gpu.memory_total_bytes = memory->total_bytes;
    gpu.memory_used_bytes = memory->used_bytes;
    gpu.memory_free_bytes = memory->free_bytes;
    gpu.memory_reserved_bytes = memory->reserved_bytes;
  } else {
    mark_unhealthy(gpu, memory.error());
  }
  if (!gpu.healthy) return gpu;  // a lost GPU would fail the rest too; don't wait on it

  if (auto utilization = optional_reading(nvml.utilization(*handle), gpu)) {
    gpu.utilization_gpu_percent = utilization->first;
    gpu.utilization_memory_percent = utilization->second;
  }
  gpu.temperature_c = optional_reading(nvml.temperature_c(*handle), gpu);
  gpu.power_mw = optional_reading(nvml.power_mw(*handle), gpu);

  return gpu;
}

}  // namespace

Result<Snapshot> take_snapshot(NvmlLibrary& nvml, bool with_processes) {
  Snapshot snapshot;
  snapshot.taken_at = std::chrono::system_clock::now();
  auto count = nvml.device_count();
  if (!count) return std::move(count).error();
  snapshot.driver_version = nvml.driver_version();
  snapshot.cuda_driver_version = nvml.cuda_driver_version();
  snapshot.gpus.reserve(*count);
  for (unsigned index = 0; index < *count; ++index) snapshot.gpus.push_back(read_gpu(nvml, index, with_processes));
  return snapshot;
}

}  // namespace gpuslot
