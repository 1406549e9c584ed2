// host_file.h — the simulated host that the fake libnvidia-ml.so.1 and fake-gpu-job share.
//
// A host is described by a JSON file (DESIGN.md "Testing without a GPU"); this header turns it
// into plain values and keeps the parsed form cached until the file changes. Tests rewrite host
// files while gpuslot runs, so every NVML call must see the current file, yet a `pick` on a
// 64-GPU host makes hundreds of calls: the cache re-reads only when stat() reports a different
// file (see WatchedFile).
#pragma once

#include <sys/stat.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace fake_nvml {

inline constexpr std::uint64_t kMiB = 1024ull * 1024ull;

// The environment variable naming the host file.
inline constexpr const char* kHostEnv = "GPUSLOT_FAKE_NVML_HOST";

// A process the host file lists as using a GPU. Its pid need not exist: the host file is the
// truth about what "other users" hold, like NVML reporting another container's processes.
struct HostProcess {
  unsigned int pid = 0;
  std::uint64_t used_bytes = 0;
};

struct HostGpu {
  std::string name;
  std::string uuid;
  std::string pci_bus_id;  // as written, e.g. "00000000:01:00.0"
  unsigned int pci_domain = 0;
  unsigned int pci_bus = 0;
  unsigned int pci_device = 0;
  unsigned int pci_device_id = 0x000010DEu;  // device id << 16 | vendor id; 0x10DE is NVIDIA
  unsigned int minor_number = 0;             // N of /dev/nvidiaN; defaults to the GPU's position
  std::uint64_t memory_total_bytes = 0;
  std::uint64_t memory_used_outside_processes_bytes = 0;
  // Absent in the file → the NVML call answers NOT_SUPPORTED, as on GPUs without the sensor.
  std::optional<unsigned int> utilization_gpu_percent;
  std::optional<unsigned int> utilization_memory_percent;
  std::optional<unsigned int> temperature_c;
  std::optional<unsigned int> power_mw;
  int compute_capability_major = 8;
  int compute_capability_minor = 9;
  std::vector<HostProcess> processes;
  bool lost = false;  // "state": "lost": every per-device call returns GPU_IS_LOST
};

struct Host {
  std::string driver_version;
  std::optional<int> cuda_driver_version;  // 12040 = CUDA 12.4
  std::optional<int> init_error;           // an nvmlReturn_t that every nvmlInit* returns
  std::vector<HostGpu> gpus;                // in NVML (PCI bus) order
};

// At most this many GPUs: the fake's handles are addresses in a static table of this size.
inline constexpr std::size_t kMaxGpus = 1024;

// The outcome of reading a host file: a host, or why there is none.
struct HostRead {
  enum class Status { ok, missing, malformed };
  Status status = Status::missing;
  std::shared_ptr<const Host> host;  // set when ok
  std::string error;                  // one line naming the file and the problem otherwise
};

// Parses host JSON text; `path` only names the file in error messages.
HostRead parse_host(const std::string& text, const std::string& path);

// Reads and parses the file without any caching (fake-gpu-job reads it once).
HostRead read_host_file(const std::string& path);

// Identity of one version of a file. Together with the pinned descriptor in WatchedFile this
// changes whenever the file is replaced (rename gives a new inode, which cannot be a recycled
// number while we still hold the old one open) or edited in place (size or times change).
struct FileIdentity {
  dev_t device = 0;
  ino_t inode = 0;
  off_t size = 0;
  timespec modified{};
  timespec changed{};
  friend bool operator==(const FileIdentity& a, const FileIdentity& b) {
    return a.device == b.device && a.inode == b.inode && a.size == b.size &&
           a.modified.tv_sec == b.modified.tv_sec && a.modified.tv_nsec == b.modified.tv_nsec &&
           a.changed.tv_sec == b.changed.tv_sec && a.changed.tv_nsec == b.changed.tv_nsec;
  }
};

// The text of one file, re-read only when stat() shows a different identity. Not thread safe:
// the caller serialises (the library holds its session lock).
class WatchedFile {
 public:
  // `recheck_after_ns` > 0: a refresh of the same path within that time of the last stat trusts
  // that stat (the library's caches: one snapshot makes ~100 calls, each of which would stat).
  explicit WatchedFile(std::int64_t recheck_after_ns = 0) : recheck_after_ns_(recheck_after_ns) {}
  WatchedFile(const WatchedFile&) = delete;
  WatchedFile& operator=(const WatchedFile&) = delete;
  ~WatchedFile();

  struct Refresh {
    int error_number = 0;  // errno of stat/open/read; ENOENT when the file does not exist
    bool changed = false;  // the text differs from the previous call's (or first read)
  };
  Refresh refresh(const std::string& path);
  const std::string& text() const { return text_; }

 private:
  void forget();
  Refresh refresh_now(const std::string& path);

  std::string path_;
  FileIdentity identity_{};
  int pinned_fd_ = -1;  // keeps the inode alive so its number cannot be reused by a new file
  std::string text_;
  bool loaded_ = false;
  // See the constructor: the last stat, of which path, and what it said.
  std::int64_t recheck_after_ns_ = 0;
  std::string checked_path_;
  std::int64_t checked_at_ns_ = -1;
  int checked_error_ = 0;
};

// How long the library trusts its last look at the host and allocations files: a live edit by a
// test is seen by a process already running at most this much later. One snapshot makes about a
// hundred NVML calls within well under this, so they share one stat() instead of a hundred.
inline constexpr std::int64_t kLibraryRecheckNs = 1'000'000;

// A host file watched for changes, parsed once per version.
class HostCache {
 public:
  // The current host, or missing / malformed. A malformed version is reported on stderr once.
  const HostRead& current(const std::string& path);

 private:
  WatchedFile file_{kLibraryRecheckNs};
  HostRead parsed_;
};

}  // namespace fake_nvml
