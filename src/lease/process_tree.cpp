// process_tree.cpp — what /proc says about a process: its start time (to tell a reused pid
// apart) and its parent (to attribute GPU memory to the lease whose holder started it).
#include <sys/types.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "lease/internal.hpp"

namespace gpuslot {
namespace {

// Fields of /proc/<pid>/stat after the command, which is in parentheses and may itself contain
// spaces and parentheses: split after the *last* ')'.
bool read_stat_fields(pid_t pid, std::string& after_command) {
  std::ifstream file("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(file, line)) return false;
  const auto close = line.rfind(')');
  if (close == std::string::npos) return false;
  after_command = line.substr(close + 1);
  return true;
}

}  // namespace

std::optional<unsigned long long> process_start_ticks(pid_t pid) {
  std::string fields;
  if (pid <= 0 || !read_stat_fields(pid, fields)) return std::nullopt;
  std::istringstream in(fields);
  std::string field;
  // After the command come field 3 (state) … field 22 (starttime): skip 19, read the 20th.
  for (int i = 0; i < 19; ++i) in >> field;
  unsigned long long start = 0;
  if (!(in >> start)) return std::nullopt;
  return start;
}

namespace lease_internal {

std::optional<pid_t> parent_of(pid_t pid, std::unordered_map<pid_t, pid_t>& cache) {
  if (auto it = cache.find(pid); it != cache.end()) return it->second;
  std::string fields;
  if (pid <= 0 || !read_stat_fields(pid, fields)) return std::nullopt;
  std::istringstream in(fields);
  std::string state;
  pid_t parent = 0;
  if (!(in >> state >> parent)) return std::nullopt;
  cache[pid] = parent;
  return parent;
}

std::optional<pid_t> session_of(pid_t pid) {
  std::string fields;
  if (pid <= 0 || !read_stat_fields(pid, fields)) return std::nullopt;
  std::istringstream in(fields);
  std::string state;
  pid_t parent = 0, group = 0, session = 0;
  if (!(in >> state >> parent >> group >> session)) return std::nullopt;
  return session;
}

}  // namespace lease_internal
}  // namespace gpuslot
