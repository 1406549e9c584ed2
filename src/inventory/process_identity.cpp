// process_identity.cpp — who runs a GPU process, read from /proc.
//
// NVML reports host PIDs even inside containers (the driver has no PID namespaces), so a pid
// that /proc does not show is reported as unknown rather than dropped: its memory is real.
#include <fcntl.h>
#include <pwd.h>
#include <unistd.h>
#include <sys/stat.h>

#include <cerrno>
#include <fstream>
#include <iterator>
#include <optional>
#include <string>
#include <string_view>

#include "gpuslot/inventory.hpp"

namespace gpuslot {

namespace {

// The name /etc/passwd gives `uid`, read directly. glibc's getpwuid first tries nscd's socket
// twice and parses nsswitch.conf: about 50 µs of CPU on these machines, several times the read.
std::optional<std::string> user_name_in_passwd(uid_t uid) {
  const int fd = ::open("/etc/passwd", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::nullopt;
  std::string text;
  char buffer[16384];
  for (;;) {
    const ssize_t n = ::read(fd, buffer, sizeof buffer);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0 || text.size() > (std::size_t(1) << 24)) break;
    text.append(buffer, std::size_t(n));
  }
  ::close(fd);
  const std::string wanted = std::to_string(uid);
  std::string_view rest = text;
  while (!rest.empty()) {
    const std::size_t end = rest.find('\n');
    const std::string_view line = rest.substr(0, end);
    rest = end == std::string_view::npos ? std::string_view() : rest.substr(end + 1);
    // name:password:uid:...; "+" and "-" lines are NIS compat entries, not users.
    const std::size_t first = line.find(':');
    if (first == 0 || first == std::string_view::npos || line[0] == '+' || line[0] == '-') continue;
    const std::size_t second = line.find(':', first + 1);
    if (second == std::string_view::npos) continue;
    const std::size_t third = line.find(':', second + 1);
    if (third == std::string_view::npos) continue;
    if (line.substr(second + 1, third - second - 1) == wanted) return std::string(line.substr(0, first));
  }
  return std::nullopt;
}

}  // namespace

std::string user_name_of(uid_t uid) {
  if (auto name = user_name_in_passwd(uid)) return std::move(*name);
  // A user the file does not list (LDAP, sssd): NSS. getpwuid_r with a stack buffer: getpwuid's
  // static storage is not thread-safe.
  passwd entry{};
  passwd* found = nullptr;
  char buffer[1024];
  if (getpwuid_r(uid, &entry, buffer, sizeof buffer, &found) == 0 && found != nullptr) return found->pw_name;
  return std::to_string(uid);
}

ProcessIdentity identify_process(pid_t pid) {
  ProcessIdentity identity;
  if (pid <= 0) return identity;
  const std::string dir = "/proc/" + std::to_string(pid);
  struct stat info {};
  if (::stat(dir.c_str(), &info) != 0) return identity;

  identity.user = user_name_of(info.st_uid);

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
