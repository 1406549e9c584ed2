// nvml_abi.h — the few NVML types gpuslot needs, declared from the ABI facts
// (../shared/reference/nvml-abi.md §1, §3, §6) rather than from NVIDIA's header, so that
// gpuslot has no build-time NVIDIA dependency. Shared by the loader and by the fake
// libnvidia-ml.so.1 in tests/fake_nvml, which must agree with it byte for byte.
//
// Layouts are x86-64/aarch64 LP64; the static_asserts pin the sizes and offsets measured
// against nvml.h 13.3 so a mistake fails the build instead of corrupting memory at run time.
#pragma once

#include <cstddef>

extern "C" {

// nvmlReturn_t is a C enum: a 4-byte int on every ABI gpuslot targets.
typedef int nvmlReturn_t;
typedef struct nvmlDevice_st* nvmlDevice_t;  // opaque; never dereferenced by callers

enum : int {
  NVML_SUCCESS = 0,
  NVML_ERROR_UNINITIALIZED = 1,
  NVML_ERROR_INVALID_ARGUMENT = 2,
  NVML_ERROR_NOT_SUPPORTED = 3,
  NVML_ERROR_NO_PERMISSION = 4,
  NVML_ERROR_NOT_FOUND = 6,
  NVML_ERROR_INSUFFICIENT_SIZE = 7,
  NVML_ERROR_DRIVER_NOT_LOADED = 9,
  NVML_ERROR_LIBRARY_NOT_FOUND = 12,
  NVML_ERROR_FUNCTION_NOT_FOUND = 13,
  NVML_ERROR_GPU_IS_LOST = 15,
  NVML_ERROR_UNKNOWN = 999,
};

enum : unsigned int {
  NVML_TEMPERATURE_GPU = 0,
  NVML_INIT_FLAG_NO_GPUS = 1u,
  NVML_DEVICE_MIG_DISABLE = 0,
};

// Buffer sizes include the NUL terminator.
enum : unsigned int {
  NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE = 80,
  NVML_DEVICE_NAME_V2_BUFFER_SIZE = 96,
  NVML_DEVICE_UUID_V2_BUFFER_SIZE = 96,
  NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE = 32,
};

// usedGpuMemory when the driver cannot tell (WDDM, some containers): (unsigned long long)-1.
#define GPUSLOT_NVML_VALUE_NOT_AVAILABLE (~0ull)

typedef struct {
  unsigned long long total;
  unsigned long long free;
  unsigned long long used;
} nvmlMemory_t;

typedef struct {
  unsigned int version;  // must be nvmlMemory_v2 = sizeof | 2 << 24; a bare 2 gives FUNCTION_NOT_FOUND
  unsigned long long total;
  unsigned long long reserved;
  unsigned long long free;
  unsigned long long used;
} nvmlMemory_v2_t;
#define GPUSLOT_NVML_MEMORY_V2_VERSION ((unsigned int)(sizeof(nvmlMemory_v2_t) | (2u << 24)))

typedef struct {
  unsigned int gpu;     // percent
  unsigned int memory;  // percent
} nvmlUtilization_t;

typedef struct {
  unsigned int pid;
  unsigned long long usedGpuMemory;
} nvmlProcessInfo_v1_t;

// The record of _v2 and _v3 process lists (nvmlProcessInfo_t is this typedef from 12.2 on).
typedef struct {
  unsigned int pid;
  unsigned long long usedGpuMemory;
  unsigned int gpuInstanceId;      // 0xFFFFFFFF when not MIG
  unsigned int computeInstanceId;  // 0xFFFFFFFF when not MIG
} nvmlProcessInfo_v2_t;

typedef struct {
  char busIdLegacy[16];
  unsigned int domain;
  unsigned int bus;
  unsigned int device;
  unsigned int pciDeviceId;
  unsigned int pciSubSystemId;
  char busId[32];
} nvmlPciInfo_t;

}  // extern "C"

static_assert(sizeof(nvmlMemory_t) == 24);
static_assert(sizeof(nvmlMemory_v2_t) == 40 && offsetof(nvmlMemory_v2_t, total) == 8);
static_assert(GPUSLOT_NVML_MEMORY_V2_VERSION == 0x02000028u);
static_assert(sizeof(nvmlUtilization_t) == 8);
static_assert(sizeof(nvmlProcessInfo_v1_t) == 16);
static_assert(sizeof(nvmlProcessInfo_v2_t) == 24 && offsetof(nvmlProcessInfo_v2_t, gpuInstanceId) == 16);
static_assert(sizeof(nvmlPciInfo_t) == 68 && offsetof(nvmlPciInfo_t, busId) == 36);
