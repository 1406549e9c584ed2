// allocations.h — GPU memory held by running fake-gpu-job processes.
//
// A real driver knows which process holds which memory and frees it when the process dies. The
// fake keeps that knowledge in a small text file beside the host file, `<host>.allocations`, one
// line per holder:
//
//     <pid> <gpu uuid> <bytes> <start time>
//
// where <start time> is field 22 of /proc/<pid>/stat (clock ticks since boot). A line counts only
// while that pid exists, is not a zombie, and still has that start time: so a SIGKILLed job's
// memory vanishes the moment it dies (as the driver frees it), and a recycled pid cannot keep a
// dead job's memory alive.
//
// Writers (fake-gpu-job) read-modify-write the file under flock(LOCK_EX) on `<host>.lock` and
// replace it by write-to-temp + rename, so readers (the library) never see a half-written file
// and need no lock.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "host_file.h"

namespace fake_nvml {

struct Allocation {
  unsigned int pid = 0;
  std::string uuid;
  std::uint64_t bytes = 0;
  std::uint64_t start_time = 0;  // /proc/<pid>/stat field 22
};

inline std::string allocations_path(const std::string& host_path) { return host_path + ".allocations"; }
inline std::string lock_path(const std::string& host_path) { return host_path + ".lock"; }

// Lines that do not parse are skipped: a stray edit must not take the whole host down.
std::vector<Allocation> parse_allocations(const std::string& text);
std::string format_allocations(const std::vector<Allocation>& allocations);

// Start time of a running process; nullopt when it is gone or a zombie (its memory is freed).
std::optional<std::uint64_t> process_start_time(unsigned int pid);

// True while the allocation's process is the one that recorded it.
bool holder_alive(const Allocation& allocation);

// The host-wide lock for read-modify-write of the allocations file; released on destruction.
class AllocationLock {
 public:
  explicit AllocationLock(const std::string& host_path);
  AllocationLock(const AllocationLock&) = delete;
  AllocationLock& operator=(const AllocationLock&) = delete;
  ~AllocationLock();
  bool held() const { return fd_ >= 0; }
  const std::string& error() const { return error_; }

 private:
  int fd_ = -1;
  std::string error_;
};

// Under the lock: the allocations whose holders are alive (dead ones are dropped).
std::vector<Allocation> read_live_allocations(const std::string& host_path);

// Under the lock: replaces the file atomically. Returns an error message, empty on success.
std::string write_allocations(const std::string& host_path, const std::vector<Allocation>& allocations);

// Whether allocation holders are alive, remembered across calls. Reading /proc/<pid>/stat costs
// ~7 us, and a `pick` on a busy 64-GPU host checks holders a few hundred times; so each holder is
// verified against /proc once and then watched through a pidfd, which becomes readable when the
// process exits (zombies included) and can never refer to a recycled pid: a ~0.2 us poll.
// Without pidfd_open (old kernels, seccomp) it falls back to /proc on every check.
class HolderLiveness {
 public:
  HolderLiveness() = default;
  HolderLiveness(const HolderLiveness&) = delete;
  HolderLiveness& operator=(const HolderLiveness&) = delete;
  ~HolderLiveness();

  bool alive(const Allocation& allocation);
  // Forgets (and closes the pidfds of) holders no longer in the file.
  void keep_only(const std::vector<Allocation>& allocations);

 private:
  struct Holder {
    unsigned int pid;
    std::uint64_t start_time;
    int pidfd;  // -1 when dead or when pidfd_open is unavailable
    bool dead;
  };
  std::vector<Holder> holders_;
};

// The library's lock-free view: re-parsed only when the file is replaced.
class AllocationCache {
 public:
  // Allocations on the GPU with this UUID whose holders are alive right now (a process can die
  // without the file changing, so liveness is checked on every call).
  std::vector<Allocation> live_on(const std::string& host_path, const std::string& uuid);

 private:
  WatchedFile file_{kLibraryRecheckNs};
  std::vector<Allocation> parsed_;
  HolderLiveness liveness_;
};

// Memory in use on one GPU as the fake reports it: memory used outside processes, the processes
// the host file lists, and live allocations on that GPU.
std::uint64_t used_bytes(const HostGpu& gpu, const std::vector<Allocation>& live_allocations);

}  // namespace fake_nvml
