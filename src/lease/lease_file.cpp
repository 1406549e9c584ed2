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
    // holder_pid 0 is a pending lease (ReserveRequest::holder_pending): live by its lock, no tree.
    if (record.id.empty() || record.gpu_uuids.empty() || record.holder_pid < 0) {
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
    return make_error(Errc::state, "cannot " + what + " lease file in " + directory + ": " + why);
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

Result<void> HeldLease::reassign(pid_t holder_pid) {
  if (fd_ < 0 || record_.path.empty()) {
    return make_error(Errc::state, "cannot reassign lease " + record_.id + ": this process no longer holds it");
  }
  const auto start_ticks = process_start_ticks(holder_pid);
  if (!start_ticks) {
    return make_error(Errc::state, "cannot reassign lease " + record_.id + " to pid " + std::to_string(holder_pid) +
                                       ": no such process");
  }
  // No host lock: a reader sees either the old file or the new one, never neither (rename is
  // atomic) and never an unlocked one (the new file is flock'ed before the rename; the old one
  // stays locked until it is no longer the name's file, and a reader that finds the old inode
  // unlocked sees the name moved on and reads again, see read_lease). Both versions reserve the
  // same bytes on the same GPUs; they differ only in whose process tree is credited, and a
  // decision made on either is one that could have been made a moment earlier or later.
  LeaseRecord next = record_;
  next.holder_pid = holder_pid;
  next.holder_start_ticks = *start_ticks;
  const std::string directory = record_.path.substr(0, record_.path.rfind('/'));
  auto fd = lease_internal::write_lease_file(directory, next, /*lock_it=*/true);
  if (!fd) {
    return make_error(Errc::state, "cannot reassign lease " + record_.id + " to pid " + std::to_string(holder_pid) +
                                       ": " + fd.error().message + "; it still names pid " + std::to_string(record_.holder_pid));
  }
  ::close(fd_);  // only now: until the rename above, this lock kept the old file live
  fd_ = *fd;
  record_ = std::move(next);
  return {};
}

void HeldLease::release() {
  if (!record_.path.empty()) ::unlink(record_.path.c_str());  // unlink first: never visible unlocked
  record_.path.clear();
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

}  // namespace gpuslot
