// cuda_device_order.h — which GPU a CUDA program's device 0 is, for fake-gpu-job.
//
// A real job allocates on cuda:0 of its process, which CUDA derives from CUDA_DEVICE_ORDER and
// CUDA_VISIBLE_DEVICES (shared/reference/cuda-visible-devices.md). The fake job must land on the
// same physical GPU, or tests of gpuslot's numbering would pass against a fake that agrees with
// gpuslot's mistakes. This is deliberately a second, independent reading of the rules: the fake
// must not link gpuslot.
#pragma once

#include <optional>
#include <string>

#include "host_file.h"

namespace fake_nvml {

// The NVML index of CUDA device 0, or nullopt when CUDA would see no GPU. `visible_devices` is
// CUDA_VISIBLE_DEVICES (nullptr when unset), `device_order` is CUDA_DEVICE_ORDER (nullptr when
// unset).
//
// Order: PCI_BUS_ID, or identical GPUs → the host file's (NVML) order. Otherwise CUDA's
// FASTEST_FIRST, emulated as a stable sort by compute capability, highest first.
// Entries: integers index that order; `GPU-…` tokens are UUIDs or unique prefixes of them.
// Parsing stops at the first invalid entry (negative, not a number, out of range, unknown or
// ambiguous UUID, MIG, or of the other kind than the first); a repeated device empties the list.
std::optional<std::size_t> cuda_device_zero(const Host& host, const char* visible_devices, const char* device_order);

}  // namespace fake_nvml
