// nvml_device.cpp — enumeration, identity and sensor queries of the fake NVML.
//
// NVML counts every GPU, lost ones included, in PCI bus order and ignores CUDA_VISIBLE_DEVICES
// (nvml-abi.md §2), so the host file's order is the NVML index. Handle lookups succeed on a lost
// GPU (the real driver still enumerates it); the per-device calls then answer GPU_IS_LOST.
#include <cstdio>

#include "nvml_session.h"

using fake_nvml::Call;
using fake_nvml::guarded;
using fake_nvml::Host;
using fake_nvml::HostGpu;
using fake_nvml::on_device;

namespace {

nvmlReturn_t device_count(unsigned int* count) noexcept {
  return guarded([&]() -> nvmlReturn_t {
    Call call;
    if (!call.initialized()) return NVML_ERROR_UNINITIALIZED;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    const Host* host = nullptr;
    if (const nvmlReturn_t rc = call.host(host); rc != NVML_SUCCESS) return rc;
    *count = static_cast<unsigned int>(host->gpus.size());
    return NVML_SUCCESS;
  });
}

nvmlReturn_t handle_by_index(unsigned int index, nvmlDevice_t* device) noexcept {
  return guarded([&]() -> nvmlReturn_t {
    Call call;
    if (!call.initialized()) return NVML_ERROR_UNINITIALIZED;
    if (!device) return NVML_ERROR_INVALID_ARGUMENT;
    const Host* host = nullptr;
    if (const nvmlReturn_t rc = call.host(host); rc != NVML_SUCCESS) return rc;
    if (index >= host->gpus.size()) return NVML_ERROR_INVALID_ARGUMENT;
    *device = fake_nvml::handle_of(index);
    return NVML_SUCCESS;
  });
}

// Finds the first GPU for which `matches(gpu)` holds; NOT_FOUND otherwise.
// `key_valid` is false for a key NVML would reject as malformed (INVALID_ARGUMENT, not NOT_FOUND).
template <class Match>
nvmlReturn_t handle_where(const void* key, bool key_valid, nvmlDevice_t* device, Match&& matches) noexcept {
  return guarded([&]() -> nvmlReturn_t {
    Call call;
    if (!call.initialized()) return NVML_ERROR_UNINITIALIZED;
    if (!key || !key_valid || !device) return NVML_ERROR_INVALID_ARGUMENT;
    const Host* host = nullptr;
    if (const nvmlReturn_t rc = call.host(host); rc != NVML_SUCCESS) return rc;
    for (std::size_t i = 0; i < host->gpus.size(); ++i) {
      if (matches(host->gpus[i])) {
        *device = fake_nvml::handle_of(static_cast<unsigned int>(i));
        return NVML_SUCCESS;
      }
    }
    return NVML_ERROR_NOT_FOUND;
  });
}

struct PciAddress {
  unsigned int domain = 0, bus = 0, device = 0;
};

// The forms NVML accepts, all hex: domain:bus:device.function, domain:bus:device,
// bus:device.function. Each must consume the whole string.
bool parse_pci_address(const char* text, PciAddress& address) {
  const std::string whole(text);
  unsigned int function = 0;
  int consumed = 0;
  auto all = [&] { return static_cast<std::size_t>(consumed) == whole.size(); };
  if (std::sscanf(text, "%x:%x:%x.%x%n", &address.domain, &address.bus, &address.device, &function, &consumed) ==
          4 && all()) {
    return true;
  }
  consumed = 0;
  if (std::sscanf(text, "%x:%x:%x%n", &address.domain, &address.bus, &address.device, &consumed) == 3 && all()) {
    return true;
  }
  consumed = 0;
  address.domain = 0;
  return std::sscanf(text, "%x:%x.%x%n", &address.bus, &address.device, &function, &consumed) == 3 && all();
}

}  // namespace

extern "C" {

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int* deviceCount) { return device_count(deviceCount); }

// v1 skips GPUs the caller may not open; the fake has no permissions model, so it equals v2.
nvmlReturn_t nvmlDeviceGetCount(unsigned int* deviceCount) { return device_count(deviceCount); }

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t* device) {
  return handle_by_index(index, device);
}

nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t* device) {
  return handle_by_index(index, device);
}

// Full-string match only: NVML answers NOT_FOUND for an abbreviated UUID (vllm#51677), unlike
// CUDA_VISIBLE_DEVICES, which accepts unique prefixes.
nvmlReturn_t nvmlDeviceGetHandleByUUID(const char* uuid, nvmlDevice_t* device) {
  return handle_where(uuid, true, device, [&](const HostGpu& gpu) { return gpu.uuid == uuid; });
}

nvmlReturn_t nvmlDeviceGetHandleByPciBusId_v2(const char* pciBusId, nvmlDevice_t* device) {
  PciAddress wanted;
  const bool parsed = pciBusId && parse_pci_address(pciBusId, wanted);
  return handle_where(pciBusId, parsed, device, [&](const HostGpu& gpu) {
    return gpu.pci_domain == wanted.domain && gpu.pci_bus == wanted.bus && gpu.pci_device == wanted.device;
  });
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int* index) {
  return on_device(device, index != nullptr, [&](Call&, const HostGpu&, unsigned int nvml_index) {
    *index = nvml_index;
    return NVML_SUCCESS;
  });
}

// /dev/nvidia<minor>: the host file's "minor_number", by default the index (as in NVIDIA's
// go-nvml mock).
nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t device, unsigned int* minorNumber) {
  return on_device(device, minorNumber != nullptr, [&](Call&, const HostGpu& gpu, unsigned int) {
    *minorNumber = gpu.minor_number;
    return NVML_SUCCESS;
  });
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char* uuid, unsigned int length) {
  return on_device(device, uuid != nullptr, [&](Call&, const HostGpu& gpu, unsigned int) {
    return fake_nvml::copy_string(gpu.uuid, uuid, length);
  });
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char* name, unsigned int length) {
  return on_device(device, name != nullptr, [&](Call&, const HostGpu& gpu, unsigned int) {
    return fake_nvml::copy_string(gpu.name, name, length);
  });
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t* pci) {
  return on_device(device, pci != nullptr, [&](Call&, const HostGpu& gpu, unsigned int) {
    *pci = nvmlPciInfo_t{};
    // NVML_DEVICE_PCI_BUS_ID_LEGACY_FMT and NVML_DEVICE_PCI_BUS_ID_FMT (nvml-abi.md §3).
    std::snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "%04X:%02X:%02X.0", gpu.pci_domain, gpu.pci_bus,
                  gpu.pci_device);
    std::snprintf(pci->busId, sizeof pci->busId, "%08X:%02X:%02X.0", gpu.pci_domain, gpu.pci_bus, gpu.pci_device);
    pci->domain = gpu.pci_domain;
    pci->bus = gpu.pci_bus;
    pci->device = gpu.pci_device;
    pci->pciDeviceId = gpu.pci_device_id;
    pci->pciSubSystemId = 0;
    return NVML_SUCCESS;
  });
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t* utilization) {
  return on_device(device, utilization != nullptr, [&](Call&, const HostGpu& gpu, unsigned int) {
    if (!gpu.utilization_gpu_percent || !gpu.utilization_memory_percent) return NVML_ERROR_NOT_SUPPORTED;
    utilization->gpu = *gpu.utilization_gpu_percent;
    utilization->memory = *gpu.utilization_memory_percent;
    return NVML_SUCCESS;
  });
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, unsigned int sensorType, unsigned int* temp) {
  return on_device(device, temp != nullptr && sensorType == NVML_TEMPERATURE_GPU,
                   [&](Call&, const HostGpu& gpu, unsigned int) {
                     if (!gpu.temperature_c) return NVML_ERROR_NOT_SUPPORTED;
                     *temp = *gpu.temperature_c;
                     return NVML_SUCCESS;
                   });
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int* power) {
  return on_device(device, power != nullptr, [&](Call&, const HostGpu& gpu, unsigned int) {
    if (!gpu.power_mw) return NVML_ERROR_NOT_SUPPORTED;
    *power = *gpu.power_mw;
    return NVML_SUCCESS;
  });
}

nvmlReturn_t nvmlDeviceGetComputeMode(nvmlDevice_t device, nvmlComputeMode_t* mode) {
  return on_device(device, mode != nullptr, [&](Call&, const HostGpu&, unsigned int) {
    *mode = NVML_COMPUTEMODE_DEFAULT;
    return NVML_SUCCESS;
  });
}

nvmlReturn_t nvmlDeviceGetCudaComputeCapability(nvmlDevice_t device, int* major, int* minor) {
  return on_device(device, major != nullptr && minor != nullptr, [&](Call&, const HostGpu& gpu, unsigned int) {
    *major = gpu.compute_capability_major;
    *minor = gpu.compute_capability_minor;
    return NVML_SUCCESS;
  });
}

// The fake has no MIG: every GPU reports MIG disabled now and after the next reset.
nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int* currentMode, unsigned int* pendingMode) {
  return on_device(device, currentMode != nullptr && pendingMode != nullptr, [&](Call&, const HostGpu&, unsigned int) {
    *currentMode = NVML_DEVICE_MIG_DISABLE;
    *pendingMode = NVML_DEVICE_MIG_DISABLE;
    return NVML_SUCCESS;
  });
}

}  // extern "C"
