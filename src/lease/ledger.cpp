// ledger.cpp — reading the leases, charging them against GPUs, and select-and-reserve.
#include <dirent.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>
#include <optional>
#include <string_view>

#include "lease/internal.hpp"

namespace gpuslot {

using namespace lease_internal;

namespace {

// The file of lease `id`, in either form lease_file_name gives.
std::optional<std::string> lease_file_of(const std::string& directory, const std::string& id) {
  DIR* dir = ::opendir(directory.c_str());
  if (dir == nullptr) return std::nullopt;
  std::optional<std::string> found;
  while (const dirent* entry = ::readdir(dir)) {
    if (is_named_for(entry->d_name, id)) {
      found = directory + "/" + entry->d_name;
      break;
    }
  }
  ::closedir(dir);
  return found;
}

// What a lease says about the process taking it when that is this process: its start time and its
// user's name, read once per thread and process (and user: a process may change its uid) rather
// than once per lease, and before the first one (Ledger's constructor), so that a launch does not
// read /proc and /etc/passwd between its snapshot and its decision. Thread-local: nothing to lock,
// also in a child forked while another thread was here.
struct SelfFacts {
  uid_t uid = 0;
  unsigned long long start_ticks = 0;
  std::string user;
};

thread_local SelfFacts self_facts_of_this_thread;
thread_local pid_t self_facts_read_in = 0;  // the pid they were read in; 0: read again

const SelfFacts& self_facts() {
  // A forked child reads its own, also where it got the pid of a process that has since exited
  // (the forking thread's copy is all the child has). The handler only zeroes an int.
  static const bool forgotten_in_children = [] {
    return ::pthread_atfork(nullptr, nullptr, [] { self_facts_read_in = 0; }) == 0;
  }();
  (void)forgotten_in_children;
  SelfFacts& facts = self_facts_of_this_thread;
  const pid_t pid = ::getpid();
  const uid_t uid = ::geteuid();
  if (self_facts_read_in != pid || facts.start_ticks == 0) {
    self_facts_read_in = pid;
    facts.start_ticks = process_start_ticks(pid).value_or(0);
  }
  if (facts.user.empty() || facts.uid != uid) {
    facts.uid = uid;
    facts.user = user_name_of(uid);
  }
  return facts;
}

}  // namespace

Ledger::Ledger(std::string directory) : directory_(std::move(directory)) { self_facts(); }

std::vector<LeaseRecord> Ledger::live_leases(std::vector<std::string>* warnings) const {
  LeaseScan scan(directory_);
  scan.refresh(warnings);
  return scan.live();
}

OutstandingReservations Ledger::outstanding(std::vector<LeaseRecord>& leases, const Snapshot& snapshot) {
  ProcessFacts facts;
  return charge_leases(leases, snapshot, facts);
}

Result<Reservation> Ledger::reserve(const ReserveRequest& request, const SnapshotSource& snapshot_source,
                                    const VisibilityOf& visibility_of, std::vector<std::string>* warnings) {
  // NVML, /etc/passwd, the lease files and /proc are read before the lock (see reserve_locked),
  // so the lock is held only for one readdir, deciding and publishing.
  auto snapshot = snapshot_source();
  if (!snapshot) return std::move(snapshot).error();
  const LeaseRecord identity = holder_identity(request);
  LedgerView view = view_before_lock(directory_, *snapshot, warnings);
  auto lock = HostLock::acquire(directory_);
  if (!lock) return lock.error();
  return reserve_locked(*this, request, identity, std::move(*snapshot), visibility_of, /*take=*/true, view, warnings);
}

namespace lease_internal {

OutstandingReservations charge_leases(const std::vector<LeaseRecord*>& leases, const Snapshot& snapshot, ProcessFacts& facts) {
  // Holder pid -> leases it holds. A pending lease (holder pid 0) has no holder yet: nothing is
  // credited against it.
  std::map<pid_t, std::vector<std::size_t>> by_holder;
  for (std::size_t i = 0; i < leases.size(); ++i) {
    leases[i]->in_use_bytes = 0;
    if (leases[i]->holder_pid > 0) by_holder[leases[i]->holder_pid].push_back(i);
  }
  // The leases of `pid` it still holds, i.e. while it is still the process that took them (a
  // reused pid is another process). Asked only of pids a GPU process's ancestry reaches, so /proc
  // is read for those holders alone, not for every lease.
  std::map<pid_t, std::vector<std::size_t>> verified;
  auto held_by = [&](pid_t pid) -> const std::vector<std::size_t>* {
    auto it = by_holder.find(pid);
    if (it == by_holder.end()) return nullptr;
    auto [entry, inserted] = verified.try_emplace(pid);
    if (inserted) {
      const auto ticks = facts.start_ticks(pid);
      for (std::size_t i : it->second) {
        if (ticks == leases[i]->holder_start_ticks) entry->second.push_back(i);
      }
    }
    return entry->second.empty() ? nullptr : &entry->second;
  };
  // Memory each lease's process tree uses on each GPU: walk each GPU process up to its ancestors.
  std::map<std::pair<std::size_t, std::string>, std::uint64_t> in_use;
  // Holds are attributed by session: the process that will use them is not born yet.
  std::map<pid_t, std::vector<std::size_t>> by_session;
  for (std::size_t i = 0; i < leases.size(); ++i) {
    if (leases[i]->expires_at_ms && leases[i]->holder_session > 0) by_session[leases[i]->holder_session].push_back(i);
  }
  // A process's memory is credited to a lease once, even where both rules reach it: a hold
  // taken by `pick --hold` from a shell is that shell's (its holder) and its session's, and the
  // job the shell then starts is both in its tree and in its session.
  std::vector<std::size_t> credited;  // leases credited with the current process's memory
  auto credit = [&](std::size_t i, const GpuInfo& gpu, std::uint64_t bytes) {
    const auto& uuids = leases[i]->gpu_uuids;
    if (std::find(uuids.begin(), uuids.end(), gpu.uuid) == uuids.end()) return;
    if (std::find(credited.begin(), credited.end(), i) != credited.end()) return;
    credited.push_back(i);
    in_use[{i, gpu.uuid}] += bytes;
    leases[i]->in_use_bytes += bytes;
  };
  for (const auto& gpu : snapshot.gpus) {
    for (const auto& process : gpu.processes) {
      if (!process.used_bytes) continue;
      credited.clear();
      if (!by_session.empty()) {
        if (auto session = facts.session(process.pid); session) {
          if (auto it = by_session.find(*session); it != by_session.end()) {
            for (std::size_t i : it->second) credit(i, gpu, *process.used_bytes);
          }
        }
      }
      if (by_holder.empty()) continue;
      pid_t pid = process.pid;
      for (int depth = 0; depth < 64 && pid > 1; ++depth) {
        if (const auto* held = held_by(pid)) {
          for (std::size_t i : *held) credit(i, gpu, *process.used_bytes);
          break;
        }
        auto parent = facts.parent(pid);
        if (!parent) break;
        pid = *parent;
      }
    }
  }
  OutstandingReservations outstanding;
  for (std::size_t i = 0; i < leases.size(); ++i) {
    for (const auto& uuid : leases[i]->gpu_uuids) {
      const GpuInfo* gpu = snapshot.find_uuid(uuid);
      if (gpu == nullptr) continue;  // that GPU is gone from this host; nothing to charge
      const std::uint64_t used = in_use[{i, uuid}];
      if (leases[i]->reserved_bytes > used) {
        auto& total = outstanding[gpu->nvml_index];
        total = add_saturating(total, leases[i]->reserved_bytes - used);
      }
    }
  }
  return outstanding;
}

OutstandingReservations charge_leases(std::vector<LeaseRecord>& leases, const Snapshot& snapshot, ProcessFacts& facts) {
  std::vector<LeaseRecord*> records;
  records.reserve(leases.size());
  for (auto& lease : leases) records.push_back(&lease);
  return charge_leases(records, snapshot, facts);
}

LeaseRecord holder_identity(const ReserveRequest& request) {
  LeaseRecord record;
  record.id = new_lease_id();  // random bytes: drawn here rather than under the lock
  const SelfFacts& self = self_facts();
  const pid_t self_pid = self_facts_read_in;  // this process, as self_facts() just checked
  if (!request.holder_pending) {
    record.holder_pid = request.owner_pid > 0 ? request.owner_pid : self_pid;
    record.holder_start_ticks =
        record.holder_pid == self_pid ? self.start_ticks : process_start_ticks(record.holder_pid).value_or(0);
  }
  record.uid = self.uid;
  record.user = self.user;
  record.reserved_bytes = request.requirements.memory_bytes;
  // Shown in `gpuslot leases`; bounded so that a lease text stays far below the size readers
  // accept (a JSON escape is up to 6 bytes per byte).
  constexpr std::size_t kLongestCommand = 4096;
  record.command = request.command.size() <= kLongestCommand ? request.command
                                                             : request.command.substr(0, kLongestCommand) + "...";
  if (request.hold) record.holder_session = request.owner_session;
  return record;
}

LedgerView view_before_lock(const std::string& directory, const Snapshot& snapshot, std::vector<std::string>* warnings) {
  LedgerView view{LeaseScan(directory), {}, {}, true};
  view.scan.refresh(warnings);
  view.inode = PreparedLeaseInode(directory, /*or_tmpfile=*/true, view.scan.inodes());  // a spare serving as a lease is listed
  charge_leases(view.scan.live_records(), snapshot, view.facts);  // for the /proc facts it reads; redone under the lock
  return view;
}

Result<Reservation> reserve_locked(Ledger& ledger, const ReserveRequest& request, const LeaseRecord& identity,
                                   Snapshot snapshot, const VisibilityOf& visibility_of, bool take,
                                   LedgerView& view, std::vector<std::string>* warnings) {
  // `snapshot`, the lease files read before the lock and `view.facts` may all predate the lock.
  // That errs only on the safe side:
  // - the set of leases is exactly the set listed now, under the lock (a name not listed now is
  //   not used, a name new or replaced since is read now), so every lease that can exist while we
  //   decide is counted; one that died since the first look is still counted, in full or less
  //   what its tree showed — more than the nothing it should count for;
  // - a lease published since the snapshot has none of its memory in it, so it is charged in full;
  //   memory freed since the snapshot still shows as used;
  // - /proc facts (holder start times, parents, sessions) a few ms old can only be out of date for
  //   a process that has exited since: a dead holder (its lease is dead, see above) or a GPU
  //   process whose parent died and that was re-parented (its memory is still credited to the
  //   lease whose tree started it, as it was when it allocated).
  // - a name listed now but not by the look before the lock is a lease taken after the snapshot,
  //   charged in full from its name where the name says what it reserves (LeaseScan::refresh).
  const std::string& directory = ledger.directory();
  if (!view.scan.refresh(warnings, view.scanned_after_snapshot ? &snapshot : nullptr)) {
    // Deciding without the leases would be deciding on a guess.
    return make_error(Errc::state, "cannot list the leases in " + directory + ": " + std::strerror(errno) +
                                       "; nothing was launched");
  }
  const std::vector<LeaseRecord*> leases = view.scan.live_records();
  OutstandingReservations reservations = charge_leases(leases, snapshot, view.facts);
  for (const auto& [index, bytes] : view.scan.charged_by_name()) reservations[index] = add_saturating(reservations[index], bytes);

  // A `pick --hold` lease whose memory has shown up has done its job: end it early.
  for (const LeaseRecord* lease : leases) {
    std::uint64_t held = 0;
    for (std::size_t i = 0; i < lease->gpu_uuids.size(); ++i) held = add_saturating(held, lease->reserved_bytes);
    if (lease->expires_at_ms && lease->in_use_bytes >= held) ::unlink(lease->path.c_str());
  }

  auto decision = select_gpus(request.requirements, snapshot, visibility_of(snapshot), reservations);
  if (!decision) return std::move(decision).error();
  Reservation reservation{std::move(*decision), std::move(snapshot), nullptr};
  if (!reservation.decision.fits() || !take) return reservation;

  LeaseRecord record = identity;
  if (record.id.empty()) record.id = new_lease_id();
  for (unsigned index : reservation.decision.chosen) {
    record.gpu_uuids.push_back(reservation.snapshot.gpus[index].uuid);
    record.nvml_indices.push_back(index);
  }
  record.taken_at_ms = now_ms();
  if (request.hold) record.expires_at_ms = record.taken_at_ms + request.hold->count();

  auto fd = write_lease_file(directory, record, !request.hold.has_value(), &view.inode);
  if (!fd) return make_error(Errc::state, fd.error().message + "; nothing was launched");
  record.path = directory + "/" + lease_file_name(record);
  reservation.lease = std::make_unique<HeldLease>(std::move(record), *fd);
  if (request.hold) reservation.lease->detach();  // lives by its expiry, not by this process
  return reservation;
}

}  // namespace lease_internal

Result<void> Ledger::release(const std::string& id) {
  if (id.empty() || id.find('/') != std::string::npos || id.find("..") != std::string::npos) {
    return make_error(Errc::bad_input, "invalid lease id '" + id + "': expected an id as `gpuslot leases` prints it");
  }
  const auto path = lease_file_of(directory_, id);
  struct stat info {};
  if (!path || ::lstat(path->c_str(), &info) != 0) {
    return make_error(Errc::bad_input, "no lease '" + id + "' in " + directory_ + " (see gpuslot leases)");
  }
  if (::unlink(path->c_str()) != 0) {
    // Another user's lease is a request this user may not make (bad input, exit 2), not a state
    // directory gone wrong.
    const int error = errno;
    return make_error(error == EPERM || error == EACCES ? Errc::bad_input : Errc::state,
                      "cannot release lease " + id + " of user " + user_name_of(info.st_uid) + ": " + std::strerror(error) +
                          "; only its holder or root can");
  }
  return {};
}

}  // namespace gpuslot
