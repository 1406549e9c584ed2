// lease/internal.hpp — pieces of the lease layer shared between its files.
#pragma once

#include <sys/types.h>

#include <optional>
#include <string>
#include <unordered_map>

#include "gpuslot/error.hpp"
#include "gpuslot/lease.hpp"

namespace gpuslot::lease_internal {

// Holds the host-wide lock for its lifetime (flock on the state directory itself).
class HostLock {
 public:
  static Result<HostLock> acquire(const std::string& directory);
  HostLock(HostLock&& other) noexcept : fd_(other.fd_) { other.fd_ = -1; }
  HostLock& operator=(HostLock&&) = delete;
  ~HostLock();

 private:
  explicit HostLock(int fd) : fd_(fd) {}
  int fd_ = -1;
};

// Serialises a record to its file's JSON text and back. Parsing rejects anything incomplete.
std::string to_json_text(const LeaseRecord& record);
Result<LeaseRecord> from_json_text(const std::string& text);

// Writes a new lease file atomically (temp file + rename) and returns its fd, flock'ed
// exclusively *before* it becomes visible, so no reader can ever see it unlocked and think its
// holder dead. Errc::state on any failure (full disk, permissions), leaving nothing behind.
Result<int> write_lease_file(const std::string& directory, const LeaseRecord& record, bool lock_it);

// True if some process holds an flock on `fd`'s file (probe with a shared, non-blocking lock).
bool is_locked_by_someone(int fd);

// Current Unix time in milliseconds.
std::int64_t now_ms();

// Parent pid of a process from /proc (nullopt if gone). Cached per call site via the map.
std::optional<pid_t> parent_of(pid_t pid, std::unordered_map<pid_t, pid_t>& cache);

// Who holds a lease about to be taken (pid, start time, uid, user, command): read from /proc
// and /etc/passwd, so it is prepared before the host lock.
LeaseRecord holder_identity(const ReserveRequest& request);

// Select-and-reserve with the host lock already held, on a snapshot that may predate the lock.
// `take` = false only decides (to describe why a waiter waits) and writes nothing.
Result<Reservation> reserve_locked(Ledger& ledger, const ReserveRequest& request, const LeaseRecord& identity,
                                   Snapshot snapshot, const VisibilityOf& visibility_of, bool take,
                                   std::vector<std::string>* warnings);

// Session id of a process from /proc (nullopt if gone).
std::optional<pid_t> session_of(pid_t pid);

// New random lease id: "<pid>-<8 hex>".
std::string new_lease_id();

}  // namespace gpuslot::lease_internal
