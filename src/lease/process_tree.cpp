// process_tree.cpp — what /proc says about a process: its start time (to tell a reused pid
// apart), its parent (to attribute GPU memory to the lease whose holder started it) and its
// session (to attribute memory to a `pick --hold`).
//
// All three come from one read of /proc/<pid>/stat, and ProcessFacts keeps what it read: a
// select-and-reserve reads /proc before the host lock and decides under the lock from the same
// facts, so the lock is not held for /proc reads.
#include <dirent.h>
#include <fcntl.h>
#include <sys/types.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "lease/internal.hpp"

namespace gpuslot {
namespace {

struct StatFields {
  pid_t parent = 0;
  pid_t session = 0;
  unsigned long long start_ticks = 0;
};

// Fields of /proc/<pid>/stat after the command, which is in parentheses and may itself contain
// spaces and parentheses: split after the *last* ')'. Then field 3 (state), 4 (ppid), 5 (pgrp),
// 6 (session) … 22 (starttime).
std::optional<StatFields> read_stat(pid_t pid) {
  if (pid <= 0) return std::nullopt;
  char path[48];
  std::snprintf(path, sizeof path, "/proc/%d/stat", int(pid));
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::nullopt;
  char buffer[1024];  // the command is at most 64 bytes; the numbers fit with room to spare
  const ssize_t n = ::read(fd, buffer, sizeof buffer - 1);
  ::close(fd);
  if (n <= 0) return std::nullopt;
  buffer[n] = '\0';
  const char* close = std::strrchr(buffer, ')');
  if (close == nullptr) return std::nullopt;
  const char* cursor = close + 1;
  StatFields fields;
  for (int field = 3; field <= 22; ++field) {
    while (*cursor == ' ') ++cursor;
    if (*cursor == '\0' || *cursor == '\n') return std::nullopt;
    char* end = nullptr;
    if (field == 4) fields.parent = pid_t(std::strtol(cursor, &end, 10));
    else if (field == 6) fields.session = pid_t(std::strtol(cursor, &end, 10));
    else if (field == 22) fields.start_ticks = std::strtoull(cursor, &end, 10);
    if (end == nullptr) {
      end = const_cast<char*>(cursor);
      while (*end != ' ' && *end != '\0' && *end != '\n') ++end;
    } else if (end == cursor) {
      return std::nullopt;
    }
    cursor = end;
  }
  return fields;
}

}  // namespace

std::optional<unsigned long long> process_start_ticks(pid_t pid) {
  const auto fields = read_stat(pid);
  if (!fields) return std::nullopt;
  return fields->start_ticks;
}

std::vector<pid_t> descendants_of(pid_t root) {
  std::map<pid_t, std::vector<pid_t>> children;
  if (DIR* proc = ::opendir("/proc")) {
    while (const dirent* entry = ::readdir(proc)) {
      char* end = nullptr;
      const long pid = std::strtol(entry->d_name, &end, 10);
      if (end == entry->d_name || *end != '\0' || pid <= 0) continue;
      if (const auto fields = read_stat(pid_t(pid))) children[fields->parent].push_back(pid_t(pid));
    }
    ::closedir(proc);
  }
  std::vector<pid_t> found;
  std::vector<pid_t> next{root};
  while (!next.empty() && found.size() < 100000) {
    const pid_t pid = next.back();
    next.pop_back();
    if (auto it = children.find(pid); it != children.end()) {
      for (pid_t child : it->second) {
        found.push_back(child);
        next.push_back(child);
      }
    }
  }
  return found;
}

namespace lease_internal {

const std::optional<ProcessFacts::Fields>& ProcessFacts::fields_of(pid_t pid) {
  if (auto it = facts_.find(pid); it != facts_.end()) return it->second;
  ++proc_reads_;
  std::optional<Fields> fields;
  if (auto read = read_stat(pid)) fields = Fields{read->parent, read->session, read->start_ticks};
  return facts_.emplace(pid, fields).first->second;
}

std::optional<unsigned long long> ProcessFacts::start_ticks(pid_t pid) {
  const auto& fields = fields_of(pid);
  if (!fields) return std::nullopt;
  return fields->start_ticks;
}

std::optional<pid_t> ProcessFacts::parent(pid_t pid) {
  const auto& fields = fields_of(pid);
  if (!fields) return std::nullopt;
  return fields->parent;
}

std::optional<pid_t> ProcessFacts::session(pid_t pid) {
  const auto& fields = fields_of(pid);
  if (!fields) return std::nullopt;
  return fields->session;
}

}  // namespace lease_internal
}  // namespace gpuslot
