// lease_file.cpp — one lease, one file: how it is written so that no reader ever sees it
// half-written or unlocked, and how it is read back without trusting it.
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <nlohmann/json.hpp>
#include <random>

#include "lease/internal.hpp"

namespace gpuslot {
namespace lease_internal {

std::int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string new_lease_id() {
  std::random_device device;
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%d-%08x", int(::getpid()), unsigned(device()));
  return buffer;
}

std::string to_json_text(const LeaseRecord& record) {
  nlohmann::json json = {
      {"format", 1},
      {"id", record.id},
      {"holder_pid", record.holder_pid},
      {"holder_start_ticks", record.holder_start_ticks},
      {"uid", record.uid},
      {"user", record.user},
      {"gpu_uuids", record.gpu_uuids},
      {"nvml_indices", record.nvml_indices},
      {"reserved_bytes", record.reserved_bytes},
      {"command", record.command},
      {"taken_at_ms", record.taken_at_ms},
      {"expires_at_ms", record.expires_at_ms ? nlohmann::json(*record.expires_at_ms) : nlohmann::json(nullptr)},
      {"holder_session", record.holder_session},
  };
  return json.dump() + "\n";
}

Result<LeaseRecord> from_json_text(const std::string& text) {
  try {
    const nlohmann::json json = nlohmann::json::parse(text);
    if (json.value("format", 0) != 1) return make_error(Errc::bad_input, "unknown lease format");
    LeaseRecord record;
    record.id = json.at("id").get<std::string>();
    record.holder_pid = json.at("holder_pid").get<pid_t>();
    record.holder_start_ticks = json.at("holder_start_ticks").get<unsigned long long>();
    record.uid = json.at("uid").get<uid_t>();
    record.user = json.at("user").get<std::string>();
    record.gpu_uuids = json.at("gpu_uuids").get<std::vector<std::string>>();
    record.nvml_indices = json.at("nvml_indices").get<std::vector<unsigned>>();
    record.reserved_bytes = json.at("reserved_bytes").get<std::uint64_t>();
    record.command = json.at("command").get<std::string>();
    record.taken_at_ms = json.at("taken_at_ms").get<std::int64_t>();
    if (!json.at("expires_at_ms").is_null()) record.expires_at_ms = json.at("expires_at_ms").get<std::int64_t>();
    record.holder_session = json.value("holder_session", pid_t(0));
    if (record.id.empty() || record.gpu_uuids.empty() || record.holder_pid <= 0) {
      return make_error(Errc::bad_input, "incomplete lease");
    }
    return record;
  } catch (const std::exception& e) {
    return make_error(Errc::bad_input, std::string("not a lease: ") + e.what());
  }
}

Result<int> write_lease_file(const std::string& directory, const LeaseRecord& record, bool lock_it) {
  const std::string final_path = directory + "/lease-" + record.id + ".json";
  const std::string temp_path = directory + "/.lease-" + record.id + ".tmp";
  auto fail = [&](const std::string& what) -> Result<int> {
    const std::string why = std::strerror(errno);
    ::unlink(temp_path.c_str());
    return make_error(Errc::state, "cannot " + what + " lease file in " + directory + ": " + why + "; nothing was launched");
  };
  const int fd = ::open(temp_path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
  if (fd < 0) return fail("create");
  ::fchmod(fd, 0644);  // readable by everyone (status, leases), writable by the holder alone
  if (lock_it && ::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    ::close(fd);
    return fail("lock");
  }
  const std::string text = to_json_text(record);
  std::size_t written = 0;
  while (written < text.size()) {
    const ssize_t n = ::write(fd, text.data() + written, text.size() - written);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      if (n == 0) errno = ENOSPC;
      const int saved = errno;
      ::close(fd);
      errno = saved;
      return fail("write");
    }
    written += std::size_t(n);
  }
  if (::rename(temp_path.c_str(), final_path.c_str()) != 0) {
    const int saved = errno;
    ::close(fd);
    errno = saved;
    return fail("publish");
  }
  return fd;
}

bool is_locked_by_someone(int fd) {
  if (::flock(fd, LOCK_SH | LOCK_NB) == 0) {
    ::flock(fd, LOCK_UN);
    return false;
  }
  return errno == EWOULDBLOCK;
}

}  // namespace lease_internal

HeldLease::~HeldLease() { release(); }

void HeldLease::detach() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  record_.path.clear();
}

void HeldLease::release() {
  if (!record_.path.empty()) ::unlink(record_.path.c_str());  // unlink first: never visible unlocked
  record_.path.clear();
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

}  // namespace gpuslot
