// Hand-made Snapshots for the visibility tests: no NVML, just the fields visibility reads.
//
// The eight UUIDs are chosen for prefix tests: GPUs 0, 4 and 6 all start with "GPU-8", and every
// GPU has a distinct two-hex-digit prefix ("GPU-1a" is GPU 1 only).
#pragma once

#include <string>
#include <vector>

#include "gpuslot/inventory.hpp"

namespace gpuslot::test {

inline const std::vector<std::string>& eight_uuids() {
  static const std::vector<std::string> uuids = {
      "GPU-8f2c1a00-1111-4222-8333-444444444400", "GPU-1a0b2c3d-1111-4222-8333-444444444401",
      "GPU-2b0b2c3d-1111-4222-8333-444444444402", "GPU-3c0b2c3d-1111-4222-8333-444444444403",
      "GPU-8a0b2c3d-1111-4222-8333-444444444404", "GPU-5e0b2c3d-1111-4222-8333-444444444405",
      "GPU-860b2c3d-1111-4222-8333-444444444406", "GPU-7f0b2c3d-1111-4222-8333-444444444407",
  };
  return uuids;
}

// One GPU per name, NVML index = position, UUIDs from eight_uuids() (names.size() <= 8).
inline Snapshot snapshot_of(const std::vector<std::string>& names) {
  Snapshot snapshot;
  for (std::size_t i = 0; i < names.size(); ++i) {
    GpuInfo gpu;
    gpu.nvml_index = static_cast<unsigned>(i);
    gpu.uuid = eight_uuids()[i];
    gpu.name = names[i];
    gpu.pci_bus_id = "00000000:0" + std::to_string(i + 1) + ":00.0";
    snapshot.gpus.push_back(gpu);
  }
  return snapshot;
}

// Eight identical GPUs: CUDA's enumeration order is PCI order whatever CUDA_DEVICE_ORDER says.
inline Snapshot eight_a100s() { return snapshot_of(std::vector<std::string>(8, "NVIDIA A100-SXM4-80GB")); }

// Four GPUs of two models interleaved: FASTEST_FIRST would renumber them.
inline Snapshot mixed_host() {
  return snapshot_of({"NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 4090",
                      "NVIDIA GeForce RTX 3090"});
}

}  // namespace gpuslot::test
