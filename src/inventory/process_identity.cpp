// process_identity.cpp — who runs a GPU process, read from /proc.
//
// NVML reports host PIDs even inside containers (the driver has no PID namespaces), so a pid
// that /proc does not show is reported as unknown rather than dropped: its memory is real.
#include <pwd.h>
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

  std::ifstream cmdline(dir + "/cmdline", std::ios::binary);
  std::string command((std::istreambuf_iterator<char>(cmdline)), std::istreambuf_iterator<char>());
  while (!command.empty() && command.back() == '\0') command.pop_back();
  for (char& c : command) {
    if (c == '\0') c = ' ';
  }
  if (command.empty()) {  // kernel threads and zombies have no command line; use comm
    std::ifstream comm(dir + "/comm");
    std::getline(comm, command);
    if (!command.empty()) command = "[" + command + "]";
  }
  if (!command.empty()) identity.command = std::move(command);
  return identity;
}

}  // namespace gpuslot
