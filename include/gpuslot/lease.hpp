// gpuslot/lease.hpp — the host-wide ledger of GPU memory reservations.
//
// The race this closes: ten launches read NVML at the same instant, none has loaded its model
// yet, all pick the same GPU. Here select-and-reserve is one step under one host-wide flock, and
// a reservation is a file in the shared state directory that its holder keeps flock'ed for as
// long as it lives. The kernel drops that lock when the holder dies, however it dies, so a
// crashed holder's lease is gone before the next decision: no time-out, no stale lock, and a
// reused pid cannot revive it (the lock belongs to an open file, not to a pid).
//
// A reservation counts against its GPUs only for the part NVML does not already show:
// outstanding = max(0, reserved − memory of the holder's process tree on that GPU), so a model
// that has loaded is not counted twice.
//
// Multi-user: the directory is 1777 like /tmp; each lease file is owned by its holder (0644);
// files that are symlinks, group/world-writable, or whose owner differs from the uid they claim
// are ignored with a warning. Files are opened without O_CREAT when they exist, so
// fs.protected_regular does not refuse them.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "gpuslot/error.hpp"
#include "gpuslot/inventory.hpp"
#include "gpuslot/policy.hpp"
#include "gpuslot/visibility.hpp"

namespace gpuslot {

// One reservation as stored in its file (lease-<id>….json in the state directory).
struct LeaseRecord {
  std::string id;
  pid_t holder_pid = 0;  // 0: pending, no holder process yet (ReserveRequest::holder_pending)
  unsigned long long holder_start_ticks = 0;  // /proc/<pid>/stat field 22: tells a reused pid apart
  uid_t uid = 0;
  std::string user;
  std::vector<std::string> gpu_uuids;
  std::vector<unsigned> nvml_indices;  // as seen when taken (for display; UUIDs are the truth)
  std::uint64_t reserved_bytes = 0;    // on each GPU
  std::string command;
  std::int64_t taken_at_ms = 0;                // Unix time
  std::optional<std::int64_t> expires_at_ms;   // `pick --hold`: lives until then, not by a lock
  pid_t holder_session = 0;  // `pick --hold`: memory of processes in this session counts as the holder's
  // Filled when read, not stored:
  std::string path;
  std::uint64_t in_use_bytes = 0;  // memory NVML shows for the holder's process tree (sum over GPUs)
};

// The state directory: GPUSLOT_STATE_DIR, else /run/gpuslot when it exists and is usable,
// else /tmp/gpuslot. Created 1777. Errc::state with the reason when unusable.
Result<std::string> open_state_directory(const std::optional<std::string>& requested = std::nullopt);

// Start time of a process in clock ticks since boot (nullopt if it does not exist).
std::optional<unsigned long long> process_start_ticks(pid_t pid);

// The processes below `root` in the process tree (children, their children, …), as /proc says
// now; a process forking meanwhile may be missed, so a caller that signals them looks twice.
std::vector<pid_t> descendants_of(pid_t root);

// A lease this process holds. Releasing (destructor or release()) ends it at once: the lease's
// name goes (its file is kept for this user's next lease, in the user's spare directory). Dying ends it too,
// through the kernel dropping the lock.
// A process forked while it holds leases (without exec) gets a copy of each lease's descriptor,
// and the kernel keeps a lock while any copy is open: the child would keep its parent's leases
// alive after the parent died. So in a forked child every HeldLease lets go of its copy at once
// (pthread_atfork) and forgets its file, without releasing the parent's lease.
class HeldLease {
 public:
  HeldLease(LeaseRecord record, int fd);
  ~HeldLease();
  HeldLease(const HeldLease&) = delete;
  HeldLease& operator=(const HeldLease&) = delete;

  const LeaseRecord& record() const { return record_; }
  // Makes `holder_pid` (with its start time from /proc) the lease's holder, keeping its id, GPUs
  // and bytes: from then on that process tree's GPU memory is credited against the lease, as for
  // `run`'s child. This process still holds the lease (its lifetime is still this object's).
  // Meant for a caller that reserved with holder_pending and then spawned the job (gpuslot batch
  // instead reserves for its shepherd as owner_pid and hands it descriptor()). The file is
  // replaced atomically and is never seen unlocked, so no host lock is taken. Errc::state with
  // the reason if `holder_pid` does not exist, the lease is no longer held (released, detached) or
  // the new file cannot be written; the old lease is then left as it was.
  Result<void> reassign(pid_t holder_pid);
  // The descriptor whose open file holds the lease's lock. Sent to another process (SCM_RIGHTS),
  // then detach()ed here, it hands the lease over: it then lives exactly as long as that process
  // keeps the descriptor, which rebuilds it as HeldLease(record with path, descriptor).
  int descriptor() const { return fd_; }
  // Keeps the file (for `pick --hold`, whose lease outlives this process by its expiry).
  void detach();
  void release();

 private:
  LeaseRecord record_;
  int fd_ = -1;
  std::vector<ino_t> former_inodes_;  // files this lease had before a reassign (never reused by it)
  friend struct HeldLeaseRegistry;
};

struct ReserveRequest {
  Requirements requirements;
  std::string command;                    // shown in `gpuslot leases`
  std::optional<std::chrono::milliseconds> hold;  // pick --hold: expiry instead of a holder lock
  pid_t owner_pid = 0;                    // whose process tree uses the memory (default: this process);
                                          // gpuslot batch: the shepherd it then hands the lease to
  pid_t owner_session = 0;                // with hold: the session whose processes will use it
  // No holder process yet (a caller reserving before it spawns the job): the lease is
  // published with holder pid 0 and start time 0, so no process tree's memory is credited against
  // it and it counts in full until HeldLease::reassign names the job. It still lives exactly as
  // long as this process holds it. Overrides owner_pid; meant for leases without `hold`.
  bool holder_pending = false;
};

struct Reservation {
  Decision decision;                  // always filled
  Snapshot snapshot;                  // the snapshot the decision was made on
  std::unique_ptr<HeldLease> lease;   // null when nothing fits
};

// Reads snapshots for the ledger (the CLI passes NVML; tests pass hand-made hosts).
using SnapshotSource = std::function<Result<Snapshot>()>;
using VisibilityOf = std::function<Visibility(const Snapshot&)>;

class Ledger {
 public:
  // Opens the ledger in `directory` (from open_state_directory).
  explicit Ledger(std::string directory);

  const std::string& directory() const { return directory_; }

  // Every live lease; dead holders' and expired leases are skipped (and removed where this
  // user may), corrupt or unsafe files are skipped with a line in `warnings`.
  std::vector<LeaseRecord> live_leases(std::vector<std::string>* warnings = nullptr) const;

  // Outstanding bytes per NVML index; fills each record's in_use_bytes.
  static OutstandingReservations outstanding(std::vector<LeaseRecord>& leases, const Snapshot& snapshot);

  // Select-and-reserve as one atomic step under the host lock. When nothing fits the Decision
  // says why and no lease is taken. Errc::state when the lease cannot be written.
  Result<Reservation> reserve(const ReserveRequest& request, const SnapshotSource& snapshot_source,
                              const VisibilityOf& visibility_of, std::vector<std::string>* warnings = nullptr);

  // Like reserve, but waits FIFO-fair until the request fits, waking when a lease is released
  // (inotify) or, at the latest, every poll interval for memory freed outside gpuslot.
  // `on_pending` is called when the pending reason changes. Errc::timeout after `timeout`.
  // `cancelled`, when given, is asked at least every 100 ms while waiting; once it says true the
  // wait ends (Errc::timeout, "wait cancelled") and leaves the queue.
  Result<Reservation> reserve_waiting(const ReserveRequest& request, const SnapshotSource& snapshot_source,
                                      const VisibilityOf& visibility_of,
                                      std::optional<std::chrono::milliseconds> timeout,
                                      const std::function<void(const std::string&)>& on_pending,
                                      std::vector<std::string>* warnings = nullptr,
                                      const std::function<bool()>& cancelled = {});

  // Removes a lease by id: its holder, or root, may. Errc::bad_input if no such lease,
  // Errc::state if not permitted.
  Result<void> release(const std::string& id);

 private:
  std::string directory_;
};

}  // namespace gpuslot
