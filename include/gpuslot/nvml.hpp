// gpuslot/nvml.hpp — NVIDIA's NVML, loaded at run time.
//
// gpuslot never links against libnvidia-ml and includes no NVIDIA header: the library is
// dlopen'ed (`libnvidia-ml.so.1`, or the path in GPUSLOT_NVML_LIBRARY), every entry point is
// resolved from the one list in src/nvml/nvml_entry_points.def (versioned names newest first),
// and nvmlInit runs once per process. Every failure becomes an Error carrying NVML's own message
// and code. The fake library in tests/fake_nvml is loaded by exactly this code.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <sys/types.h>
#include <vector>

#include "gpuslot/error.hpp"

namespace gpuslot {

// NVML's result for one call: 0 is success; `message` is "<nvmlErrorString> (NVML error N in
// <function>)".
struct NvmlStatus {
  int code = 0;
  std::string message;
  bool ok() const { return code == 0; }
};

struct NvmlMemory {
  std::uint64_t total_bytes = 0;
  std::uint64_t free_bytes = 0;
  std::uint64_t used_bytes = 0;
  std::optional<std::uint64_t> reserved_bytes;  // only from nvmlDeviceGetMemoryInfo_v2
};

struct NvmlProcess {
  pid_t pid = 0;
  std::optional<std::uint64_t> used_bytes;
};

class NvmlLibrary {
 public:
  // Opens and initialises NVML once per process and path (later calls return the same object).
  // `path` empty: GPUSLOT_NVML_LIBRARY if set, else "libnvidia-ml.so.1". Errc::nvml_unavailable
  // when the library, a required symbol, or nvmlInit fails (with NVML's message).
  static Result<std::shared_ptr<NvmlLibrary>> open(const std::string& path = {});

  ~NvmlLibrary();
  NvmlLibrary(const NvmlLibrary&) = delete;
  NvmlLibrary& operator=(const NvmlLibrary&) = delete;

  const std::string& path() const;

  Result<unsigned> device_count();
  // Opaque device handle for `index`; errors as NvmlStatus in the Error message.
  using Handle = void*;
  Result<Handle> handle(unsigned index);

  std::optional<std::string> driver_version();
  std::optional<int> cuda_driver_version();

  Result<std::string> uuid(Handle device);
  Result<std::string> name(Handle device);
  Result<std::string> pci_bus_id(Handle device);
  Result<unsigned> minor_number(Handle device);  // N of /dev/nvidiaN
  Result<NvmlMemory> memory(Handle device);
  Result<std::pair<unsigned, unsigned>> utilization(Handle device);  // gpu %, memory %
  Result<unsigned> temperature_c(Handle device);
  Result<unsigned> power_mw(Handle device);
  Result<std::vector<NvmlProcess>> compute_processes(Handle device);

  // Error::nvml_code of a lost GPU, for health decisions.
  static constexpr int kGpuIsLost = 15;

  struct Impl;

 private:
  explicit NvmlLibrary(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace gpuslot
