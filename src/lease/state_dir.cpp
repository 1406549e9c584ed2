// state_dir.cpp — the shared state directory and the host-wide lock.
//
// The directory is shared by every user of the host, like /tmp: mode 1777, so anyone may add a
// lease and only its owner (or root) may remove it. We refuse a directory that is a symlink or
// world-writable without the sticky bit, because then any user could delete others' leases.
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "lease/internal.hpp"

namespace gpuslot {
namespace {

Error state_error(const std::string& message) { return make_error(Errc::state, message); }

std::string errno_text() { return std::strerror(errno); }

// mkdir -m 1777 that umask cannot weaken, then checks what is there (it may predate us).
Result<void> ensure_directory(const std::string& path) {
  if (::mkdir(path.c_str(), 01777) == 0) {
    if (::chmod(path.c_str(), 01777) != 0) return state_error("cannot set mode 1777 on state directory " + path + ": " + errno_text());
  } else if (errno != EEXIST) {
    return state_error("cannot create state directory " + path + ": " + errno_text() +
                       "; set GPUSLOT_STATE_DIR to a writable directory");
  }
  struct stat info {};
  if (::lstat(path.c_str(), &info) != 0) return state_error("cannot inspect state directory " + path + ": " + errno_text());
  if (S_ISLNK(info.st_mode)) return state_error("state directory " + path + " is a symlink; refusing it (remove it or set GPUSLOT_STATE_DIR)");
  if (!S_ISDIR(info.st_mode)) return state_error("state path " + path + " is not a directory");
  if ((info.st_mode & S_IWOTH) != 0 && (info.st_mode & S_ISVTX) == 0) {
    return state_error("state directory " + path + " is world-writable without the sticky bit, so any user could delete "
                       "leases; run: chmod 1777 " + path);
  }
  if (::access(path.c_str(), W_OK | X_OK) != 0) {
    return state_error("state directory " + path + " is not writable by this user (" + errno_text() +
                       "); ask the owner to chmod 1777 it, or set GPUSLOT_STATE_DIR");
  }
  return {};
}

}  // namespace

Result<std::string> open_state_directory(const std::optional<std::string>& requested) {
  std::string path;
  if (requested && !requested->empty()) {
    path = *requested;
  } else if (const char* from_env = std::getenv("GPUSLOT_STATE_DIR"); from_env != nullptr && *from_env != '\0') {
    path = from_env;
  } else {
    // /run/gpuslot when an administrator made it (tmpfs, cleared at boot), else /tmp/gpuslot.
    struct stat info {};
    if (::lstat("/run/gpuslot", &info) == 0 && S_ISDIR(info.st_mode) && ::access("/run/gpuslot", W_OK | X_OK) == 0) {
      path = "/run/gpuslot";
    } else {
      path = "/tmp/gpuslot";
    }
  }
  if (auto ok = ensure_directory(path); !ok) return ok.error();
  return path;
}

namespace lease_internal {

Result<HostLock> HostLock::acquire(const std::string& directory) {
  // The lock is taken on the directory itself, not on a file in it: in a sticky directory the
  // creator of a lock file could delete it and split the lock; nobody can delete the directory
  // while it holds leases.
  const int fd = ::open(directory.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return state_error("cannot open state directory " + directory + ": " + errno_text());
  while (::flock(fd, LOCK_EX) != 0) {
    if (errno != EINTR) {
      const std::string why = errno_text();
      ::close(fd);
      return state_error("cannot lock state directory " + directory + ": " + why);
    }
  }
  return HostLock(fd);
}

HostLock::~HostLock() {
  if (fd_ >= 0) ::close(fd_);  // closing drops the flock
}

}  // namespace lease_internal
}  // namespace gpuslot
