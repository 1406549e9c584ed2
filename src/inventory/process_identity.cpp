// process_identity.cpp — who runs a GPU process, read from /proc.
//
// NVML reports host PIDs even inside containers (the driver has no PID namespaces), so a pid
// that /proc does not show is reported as unknown rather than dropped: its memory is real.
#include <fcntl.h>
#include <pwd.h>
#include <unistd.h>
#include <sys/stat.h>

#include <fstream>
#include <iterator>
#include <string>

#include "gpuslot/inventory.hpp"

namespace gpuslot {

ProcessIdentity identify_process(pid_t pid) {
  ProcessIdentity identity;
  if (pid <= 0) return identity;
  const std::string dir = "/proc/" + std::to_string(pid);
  struct stat info {};
  if (::stat(dir.c_str(), &info) != 0) return identity;

  // getpwuid_r with a stack buffer: getpwuid's static storage is not thread-safe.
  passwd entry{};
  passwd* found = nullptr;
  char buffer[1024];
  if (getpwuid_r(info.st_uid, &entry, buffer, sizeof buffer, &found) == 0 && found != nullptr) {
    identity.user = found->pw_name;
  } else {
    identity.user = std::to_string(info.st_uid);
  }

  // Plain read(2): the process may exit while we read (ESRCH), which iostreams turn into an
  // exception; here it just means "command unknown".
  std::string command;
  if (const int fd = ::open((dir + "/cmdline").c_str(), O_RDONLY | O_CLOEXEC); fd >= 0) {
    char chunk[4096];
    ssize_t n = 0;
    while (command.size() < 65536 && (n = ::read(fd, chunk, sizeof chunk)) > 0) command.append(chunk, std::size_t(n));
    ::close(fd);
  }
  while (!command.empty() && command.back() == '\0') command.pop_back();
  for (char& c : command) {
    if (c == '\0') c = ' ';
  }
  if (command.empty()) {  // kernel threads and zombies have no command line; use comm
    if (const int fd = ::open((dir + "/comm").c_str(), O_RDONLY | O_CLOEXEC); fd >= 0) {
      char comm[64];
      const ssize_t n = ::read(fd, comm, sizeof comm);
      ::close(fd);
      if (n > 0) command = "[" + std::string(comm, std::size_t(n) - (comm[n - 1] == '\n' ? 1 : 0)) + "]";
    }
  }
  if (!command.empty()) identity.command = std::move(command);
  return identity;
}

}  // namespace gpuslot
