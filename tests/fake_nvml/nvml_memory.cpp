// nvml_memory.cpp — memory and process-list queries of the fake NVML.
//
// Memory in use = memory used outside processes + the processes the host file lists + live
// fake-gpu-job allocations on that GPU (allocations.h). That is the whole point of the fake: a
// job that starts shows up in NVML's numbers and process list, and disappears when it dies,
// exactly what gpuslot's reservation accounting must cope with.
#include <algorithm>
#include <utility>

#include "nvml_session.h"

using fake_nvml::Call;
using fake_nvml::HostGpu;
using fake_nvml::on_device;

namespace {

struct MemoryNumbers {
  unsigned long long total = 0, used = 0, free = 0;
};

// NVML promises total = free + used, so an over-committed host file reports a full GPU rather
// than more used than exists.
MemoryNumbers memory_of(Call& call, const HostGpu& gpu) {
  const auto used = fake_nvml::used_bytes(gpu, call.live_allocations(gpu.uuid));
  MemoryNumbers numbers;
  numbers.total = gpu.memory_total_bytes;
  numbers.used = std::min<unsigned long long>(used, gpu.memory_total_bytes);
  numbers.free = numbers.total - numbers.used;
  return numbers;
}

// (pid, bytes) of every compute process: listed ones first, then live allocations, one entry per
// pid as the driver reports it.
std::vector<std::pair<unsigned int, unsigned long long>> compute_processes(Call& call, const HostGpu& gpu) {
  std::vector<std::pair<unsigned int, unsigned long long>> processes;
  for (const auto& process : gpu.processes) processes.emplace_back(process.pid, process.used_bytes);
  for (const auto& allocation : call.live_allocations(gpu.uuid)) {
    auto same_pid = [&](const auto& entry) { return entry.first == allocation.pid; };
    if (auto it = std::find_if(processes.begin(), processes.end(), same_pid); it != processes.end()) {
      it->second += allocation.bytes;
    } else {
      processes.emplace_back(allocation.pid, allocation.bytes);
    }
  }
  return processes;
}

void fill(nvmlProcessInfo_v1_t& record, unsigned int pid, unsigned long long bytes) {
  record = nvmlProcessInfo_v1_t{};
  record.pid = pid;
  record.usedGpuMemory = bytes;
}

void fill(nvmlProcessInfo_v2_t& record, unsigned int pid, unsigned long long bytes) {
  record = nvmlProcessInfo_v2_t{};
  record.pid = pid;
  record.usedGpuMemory = bytes;
  record.gpuInstanceId = 0xFFFFFFFFu;  // not a MIG instance
  record.computeInstanceId = 0xFFFFFFFFu;
}

// NVML's process-list convention (nvml-abi.md §4): *infoCount == 0 is a size query in which
// `infos` may be NULL, answered SUCCESS when there are no processes and INSUFFICIENT_SIZE with the
// count otherwise; a too-small array gets INSUFFICIENT_SIZE and the required count; on SUCCESS
// *infoCount is the number written.
template <class Record>
nvmlReturn_t process_list(nvmlDevice_t device, unsigned int* infoCount, Record* infos, bool graphics) {
  const bool arguments_ok = infoCount != nullptr && (infos != nullptr || *infoCount == 0);
  return on_device(device, arguments_ok, [&](Call& call, const HostGpu& gpu, unsigned int) {
    // The fake runs no graphics work: the graphics list is always empty.
    const auto processes = graphics ? decltype(compute_processes(call, gpu)){} : compute_processes(call, gpu);
    const auto needed = static_cast<unsigned int>(processes.size());
    if (*infoCount < needed) {
      *infoCount = needed;
      return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    for (unsigned int i = 0; i < needed; ++i) fill(infos[i], processes[i].first, processes[i].second);
    *infoCount = needed;
    return NVML_SUCCESS;
  });
}

}  // namespace

extern "C" {

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t* memory) {
  return on_device(device, memory != nullptr, [&](Call& call, const HostGpu& gpu, unsigned int) {
    const MemoryNumbers numbers = memory_of(call, gpu);
    memory->total = numbers.total;
    memory->free = numbers.free;
    memory->used = numbers.used;
    return NVML_SUCCESS;
  });
}

// The real driver rejects any version but nvmlMemory_v2 (0x02000028) with FUNCTION_NOT_FOUND,
// including the bare 2 that the header's comment suggests (nvml-abi.md §5.2). The fake has no
// driver-reserved memory, so reserved is 0 and used equals v1's.
nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t* memory) {
  if (memory && memory->version != GPUSLOT_NVML_MEMORY_V2_VERSION) {
    return fake_nvml::guarded([]() -> nvmlReturn_t {
      Call call;
      return call.initialized() ? NVML_ERROR_FUNCTION_NOT_FOUND : NVML_ERROR_UNINITIALIZED;
    });
  }
  return on_device(device, memory != nullptr, [&](Call& call, const HostGpu& gpu, unsigned int) {
    const MemoryNumbers numbers = memory_of(call, gpu);
    memory->total = numbers.total;
    memory->reserved = 0;
    memory->free = numbers.free;
    memory->used = numbers.used;
    return NVML_SUCCESS;
  });
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int* infoCount,
                                                     nvmlProcessInfo_v2_t* infos) {
  return process_list(device, infoCount, infos, false);
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t device, unsigned int* infoCount,
                                                     nvmlProcessInfo_v2_t* infos) {
  return process_list(device, infoCount, infos, false);
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses(nvmlDevice_t device, unsigned int* infoCount,
                                                  nvmlProcessInfo_v1_t* infos) {
  return process_list(device, infoCount, infos, false);
}

nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t device, unsigned int* infoCount,
                                                      nvmlProcessInfo_v2_t* infos) {
  return process_list(device, infoCount, infos, true);
}

}  // extern "C"
