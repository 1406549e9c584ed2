// ledger.cpp — reading the leases, charging them against GPUs, and select-and-reserve.
#include <dirent.h>
#include <fcntl.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <set>

#include "lease/internal.hpp"

namespace gpuslot {

using namespace lease_internal;

namespace {

std::string user_name(uid_t uid) {
  passwd entry{};
  passwd* found = nullptr;
  char buffer[1024];
  if (getpwuid_r(uid, &entry, buffer, sizeof buffer, &found) == 0 && found != nullptr) return found->pw_name;
  return std::to_string(uid);
}

// Reads one lease file defensively. nullopt (with a warning where useful) for anything that is
// not a live, well-formed lease owned by the uid it claims.
std::optional<LeaseRecord> read_lease(const std::string& path, std::vector<std::string>* warnings) {
  auto warn = [&](const std::string& why) {
    if (warnings != nullptr) warnings->push_back("ignoring lease file " + path + ": " + why);
  };
  const int fd = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    if (errno == ELOOP) warn("it is a symlink");
    return std::nullopt;  // ENOENT: released while we listed the directory
  }
  struct stat info {};
  if (::fstat(fd, &info) != 0 || !S_ISREG(info.st_mode) || (info.st_mode & (S_IWGRP | S_IWOTH)) != 0 ||
      info.st_size > 65536) {
    ::close(fd);
    warn("not a regular file, group/world-writable, or too large");
    return std::nullopt;
  }
  std::string text(std::size_t(info.st_size), '\0');
  const ssize_t n = ::pread(fd, text.data(), text.size(), 0);
  text.resize(n > 0 ? std::size_t(n) : 0);
  auto record = from_json_text(text);
  const bool locked = is_locked_by_someone(fd);
  ::close(fd);
  if (!record) {
    warn(record.error().message);
    return std::nullopt;
  }
  if (record->uid != info.st_uid) {
    warn("it claims uid " + std::to_string(record->uid) + " but is owned by uid " + std::to_string(info.st_uid));
    return std::nullopt;
  }
  const bool live = record->expires_at_ms ? now_ms() < *record->expires_at_ms : locked;
  if (!live) {
    ::unlink(path.c_str());  // our own or root's to clean; the sticky bit refuses others, harmlessly
    return std::nullopt;
  }
  record->path = path;
  return std::move(record).value();
}

}  // namespace

Ledger::Ledger(std::string directory) : directory_(std::move(directory)) {}

std::vector<LeaseRecord> Ledger::live_leases(std::vector<std::string>* warnings) const {
  std::vector<LeaseRecord> leases;
  DIR* dir = ::opendir(directory_.c_str());
  if (dir == nullptr) return leases;
  while (const dirent* entry = ::readdir(dir)) {
    const std::string name = entry->d_name;
    if (name.rfind("lease-", 0) != 0 || name.size() < 11 || name.compare(name.size() - 5, 5, ".json") != 0) continue;
    if (auto record = read_lease(directory_ + "/" + name, warnings)) leases.push_back(std::move(*record));
  }
  ::closedir(dir);
  std::sort(leases.begin(), leases.end(), [](const LeaseRecord& a, const LeaseRecord& b) { return a.taken_at_ms < b.taken_at_ms; });
  return leases;
}

OutstandingReservations Ledger::outstanding(std::vector<LeaseRecord>& leases, const Snapshot& snapshot) {
  // Holder pid -> leases it holds, but only while that pid is still the process that took them.
  std::map<pid_t, std::vector<std::size_t>> by_holder;
  for (std::size_t i = 0; i < leases.size(); ++i) {
    leases[i].in_use_bytes = 0;
    if (process_start_ticks(leases[i].holder_pid) == leases[i].holder_start_ticks) by_holder[leases[i].holder_pid].push_back(i);
  }
  // Memory each lease's process tree uses on each GPU: walk each GPU process up to its ancestors.
  std::map<std::pair<std::size_t, std::string>, std::uint64_t> in_use;
  std::unordered_map<pid_t, pid_t> parents;
  // Holds are attributed by session: the process that will use them is not born yet.
  std::map<pid_t, std::vector<std::size_t>> by_session;
  for (std::size_t i = 0; i < leases.size(); ++i) {
    if (leases[i].expires_at_ms && leases[i].holder_session > 0) by_session[leases[i].holder_session].push_back(i);
  }
  for (const auto& gpu : snapshot.gpus) {
    for (const auto& process : gpu.processes) {
      if (!process.used_bytes) continue;
      if (!by_session.empty()) {
        if (auto session = session_of(process.pid); session) {
          if (auto it = by_session.find(*session); it != by_session.end()) {
            for (std::size_t i : it->second) {
              const auto& uuids = leases[i].gpu_uuids;
              if (std::find(uuids.begin(), uuids.end(), gpu.uuid) == uuids.end()) continue;
              in_use[{i, gpu.uuid}] += *process.used_bytes;
              leases[i].in_use_bytes += *process.used_bytes;
            }
          }
        }
      }
      if (by_holder.empty()) continue;
      pid_t pid = process.pid;
      for (int depth = 0; depth < 64 && pid > 1; ++depth) {
        if (auto it = by_holder.find(pid); it != by_holder.end()) {
          for (std::size_t i : it->second) {
            const auto& uuids = leases[i].gpu_uuids;
            if (std::find(uuids.begin(), uuids.end(), gpu.uuid) == uuids.end()) continue;
            in_use[{i, gpu.uuid}] += *process.used_bytes;
            leases[i].in_use_bytes += *process.used_bytes;
          }
          break;
        }
        auto parent = parent_of(pid, parents);
        if (!parent) break;
        pid = *parent;
      }
    }
  }
  OutstandingReservations outstanding;
  for (std::size_t i = 0; i < leases.size(); ++i) {
    for (const auto& uuid : leases[i].gpu_uuids) {
      const GpuInfo* gpu = snapshot.find_uuid(uuid);
      if (gpu == nullptr) continue;  // that GPU is gone from this host; nothing to charge
      const std::uint64_t used = in_use[{i, uuid}];
      if (leases[i].reserved_bytes > used) outstanding[gpu->nvml_index] += leases[i].reserved_bytes - used;
    }
  }
  return outstanding;
}

Result<Reservation> Ledger::reserve(const ReserveRequest& request, const SnapshotSource& snapshot_source,
                                    const VisibilityOf& visibility_of, std::vector<std::string>* warnings) {
  // NVML and /etc/passwd are read before the lock (see reserve_locked), so the lock is held only
  // for listing leases, deciding and publishing.
  auto snapshot = snapshot_source();
  if (!snapshot) return std::move(snapshot).error();
  const LeaseRecord identity = holder_identity(request);
  auto lock = HostLock::acquire(directory_);
  if (!lock) return lock.error();
  return reserve_locked(*this, request, identity, std::move(*snapshot), visibility_of, /*take=*/true, warnings);
}

namespace lease_internal {

LeaseRecord holder_identity(const ReserveRequest& request) {
  LeaseRecord record;
  record.holder_pid = request.owner_pid > 0 ? request.owner_pid : ::getpid();
  record.holder_start_ticks = process_start_ticks(record.holder_pid).value_or(0);
  record.uid = ::geteuid();
  record.user = user_name(record.uid);
  record.reserved_bytes = request.requirements.memory_bytes;
  record.command = request.command;
  if (request.hold) record.holder_session = request.owner_session;
  return record;
}

Result<Reservation> reserve_locked(Ledger& ledger, const ReserveRequest& request, const LeaseRecord& identity,
                                   Snapshot snapshot, const VisibilityOf& visibility_of, bool take,
                                   std::vector<std::string>* warnings) {
  // `snapshot` may predate the lock. That errs only on the safe side: a lease published since is
  // in `leases` with none of its memory yet in the snapshot, so it is charged in full; memory
  // freed since still shows as used.
  const std::string& directory = ledger.directory();
  std::vector<LeaseRecord> leases = ledger.live_leases(warnings);
  const OutstandingReservations reservations = Ledger::outstanding(leases, snapshot);

  // A `pick --hold` lease whose memory has shown up has done its job: end it early.
  for (const auto& lease : leases) {
    if (lease.expires_at_ms && lease.in_use_bytes >= lease.reserved_bytes * lease.gpu_uuids.size()) ::unlink(lease.path.c_str());
  }

  auto decision = select_gpus(request.requirements, snapshot, visibility_of(snapshot), reservations);
  if (!decision) return std::move(decision).error();
  Reservation reservation{std::move(*decision), std::move(snapshot), nullptr};
  if (!reservation.decision.fits() || !take) return reservation;

  LeaseRecord record = identity;
  record.id = new_lease_id();
  for (unsigned index : reservation.decision.chosen) {
    record.gpu_uuids.push_back(reservation.snapshot.gpus[index].uuid);
    record.nvml_indices.push_back(index);
  }
  record.taken_at_ms = now_ms();
  if (request.hold) record.expires_at_ms = record.taken_at_ms + request.hold->count();

  auto fd = write_lease_file(directory, record, !request.hold.has_value());
  if (!fd) return fd.error();
  record.path = directory + "/lease-" + record.id + ".json";
  reservation.lease = std::make_unique<HeldLease>(std::move(record), *fd);
  if (request.hold) reservation.lease->detach();  // lives by its expiry, not by this process
  return reservation;
}

}  // namespace lease_internal

Result<void> Ledger::release(const std::string& id) {
  if (id.empty() || id.find('/') != std::string::npos || id.find("..") != std::string::npos) {
    return make_error(Errc::bad_input, "invalid lease id '" + id + "': expected an id as `gpuslot leases` prints it");
  }
  const std::string path = directory_ + "/lease-" + id + ".json";
  struct stat info {};
  if (::lstat(path.c_str(), &info) != 0) {
    return make_error(Errc::bad_input, "no lease '" + id + "' in " + directory_ + " (see gpuslot leases)");
  }
  if (::unlink(path.c_str()) != 0) {
    return make_error(Errc::state, "cannot release lease " + id + " of user " + user_name(info.st_uid) + ": " +
                                       std::strerror(errno) + "; only its holder or root can");
  }
  return {};
}

}  // namespace gpuslot
