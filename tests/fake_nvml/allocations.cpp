// allocations.cpp — the file of live allocations (format and rules in allocations.h).
#include "allocations.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/file.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <sstream>

namespace fake_nvml {

std::vector<Allocation> parse_allocations(const std::string& text) {
  std::vector<Allocation> allocations;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream fields(line);
    Allocation allocation;
    std::string rest;
    if (fields >> allocation.pid >> allocation.uuid >> allocation.bytes >> allocation.start_time &&
        !(fields >> rest) && allocation.pid != 0) {
      allocations.push_back(std::move(allocation));
    }
  }
  return allocations;
}

std::string format_allocations(const std::vector<Allocation>& allocations) {
  std::string text = "# fake-gpu-job allocations: pid uuid bytes starttime\n";
  for (const auto& a : allocations) {
    text += std::to_string(a.pid) + ' ' + a.uuid + ' ' + std::to_string(a.bytes) + ' ' +
            std::to_string(a.start_time) + '\n';
  }
  return text;
}

std::optional<std::uint64_t> process_start_time(unsigned int pid) {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%u/stat", pid);
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::nullopt;
  char buffer[1024];
  const ssize_t got = ::read(fd, buffer, sizeof buffer - 1);
  ::close(fd);
  if (got <= 0) return std::nullopt;
  buffer[got] = '\0';
  // The command name (field 2) may contain spaces and ')', so fields are counted from the last ')'.
  const char* after_name = std::strrchr(buffer, ')');
  if (!after_name) return std::nullopt;
  std::istringstream fields(after_name + 1);
  std::string state;
  fields >> state;
  // A zombie has exited; the driver has already freed its memory. 'X' is the dead state.
  if (state.empty() || state == "Z" || state == "X") return std::nullopt;
  std::string skipped;
  for (int field = 4; field < 22; ++field) fields >> skipped;  // ppid .. itrealvalue
  std::uint64_t start_time = 0;
  if (!(fields >> start_time)) return std::nullopt;
  return start_time;
}

bool holder_alive(const Allocation& allocation) {
  const auto start_time = process_start_time(allocation.pid);
  return start_time && *start_time == allocation.start_time;
}

AllocationLock::AllocationLock(const std::string& host_path) {
  const std::string path = lock_path(host_path);
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0666);
  if (fd_ < 0) {
    error_ = "cannot open lock file " + path + ": " + std::strerror(errno);
    return;
  }
  while (::flock(fd_, LOCK_EX) != 0) {
    if (errno == EINTR) continue;
    error_ = "cannot lock " + path + ": " + std::strerror(errno);
    ::close(fd_);
    fd_ = -1;
    return;
  }
}

AllocationLock::~AllocationLock() {
  if (fd_ >= 0) ::close(fd_);  // closing the only descriptor releases the flock
}

std::vector<Allocation> read_live_allocations(const std::string& host_path) {
  WatchedFile file;
  if (file.refresh(allocations_path(host_path)).error_number != 0) return {};
  std::vector<Allocation> live;
  for (auto& allocation : parse_allocations(file.text())) {
    if (holder_alive(allocation)) live.push_back(std::move(allocation));
  }
  return live;
}

std::string write_allocations(const std::string& host_path, const std::vector<Allocation>& allocations) {
  const std::string path = allocations_path(host_path);
  // One temp name per writer; the lock means there is only one writer at a time anyway.
  const std::string temp = path + ".tmp." + std::to_string(::getpid());
  const std::string text = format_allocations(allocations);
  const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd < 0) return "cannot create " + temp + ": " + std::strerror(errno);
  std::size_t written = 0;
  while (written < text.size()) {
    const ssize_t put = ::write(fd, text.data() + written, text.size() - written);
    if (put < 0) {
      if (errno == EINTR) continue;
      const std::string error = "cannot write " + temp + ": " + std::strerror(errno);
      ::close(fd);
      ::unlink(temp.c_str());
      return error;
    }
    written += static_cast<std::size_t>(put);
  }
  ::close(fd);
  if (::rename(temp.c_str(), path.c_str()) != 0) {
    const std::string error = "cannot rename " + temp + " to " + path + ": " + std::strerror(errno);
    ::unlink(temp.c_str());
    return error;
  }
  return {};
}

namespace {
int open_pidfd(unsigned int pid) {
#ifdef SYS_pidfd_open
  return static_cast<int>(::syscall(SYS_pidfd_open, static_cast<pid_t>(pid), 0));  // always O_CLOEXEC
#else
  (void)pid;
  return -1;
#endif
}
}  // namespace

HolderLiveness::~HolderLiveness() { keep_only({}); }

bool HolderLiveness::alive(const Allocation& allocation) {
  auto it = std::find_if(holders_.begin(), holders_.end(), [&](const Holder& h) {
    return h.pid == allocation.pid && h.start_time == allocation.start_time;
  });
  if (it == holders_.end()) {
    // Open first, verify second: if the start time still matches after the pidfd exists, the
    // pidfd refers to the recorded process and not to a later owner of the same pid.
    const int pidfd = open_pidfd(allocation.pid);
    const bool verified = holder_alive(allocation);
    if (!verified && pidfd >= 0) ::close(pidfd);
    holders_.push_back({allocation.pid, allocation.start_time, verified ? pidfd : -1, !verified});
    return verified;
  }
  if (it->dead) return false;
  if (it->pidfd < 0) {
    it->dead = !holder_alive(allocation);
  } else {
    pollfd exited{it->pidfd, POLLIN, 0};
    if (::poll(&exited, 1, 0) != 0) {  // readable (exited) or an error: either way, gone
      ::close(it->pidfd);
      it->pidfd = -1;
      it->dead = true;
    }
  }
  return !it->dead;
}

void HolderLiveness::keep_only(const std::vector<Allocation>& allocations) {
  std::erase_if(holders_, [&](const Holder& holder) {
    const bool listed = std::any_of(allocations.begin(), allocations.end(), [&](const Allocation& a) {
      return a.pid == holder.pid && a.start_time == holder.start_time;
    });
    if (!listed && holder.pidfd >= 0) ::close(holder.pidfd);
    return !listed;
  });
}

std::vector<Allocation> AllocationCache::live_on(const std::string& host_path, const std::string& uuid) {
  const auto refresh = file_.refresh(allocations_path(host_path));
  if (refresh.error_number != 0) {
    parsed_.clear();  // no file yet: nothing allocated
    liveness_.keep_only(parsed_);
  } else if (refresh.changed) {
    parsed_ = parse_allocations(file_.text());
    liveness_.keep_only(parsed_);
  }
  std::vector<Allocation> live;
  for (const auto& allocation : parsed_) {
    if (allocation.uuid == uuid && liveness_.alive(allocation)) live.push_back(allocation);
  }
  return live;
}

std::uint64_t used_bytes(const HostGpu& gpu, const std::vector<Allocation>& live_allocations) {
  std::uint64_t used = gpu.memory_used_outside_processes_bytes;
  for (const auto& process : gpu.processes) used += process.used_bytes;
  for (const auto& allocation : live_allocations) {
    if (allocation.uuid == gpu.uuid) used += allocation.bytes;
  }
  return used;
}

}  // namespace fake_nvml
