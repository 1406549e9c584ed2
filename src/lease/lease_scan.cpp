// lease_scan.cpp — reading the lease files of the state directory without trusting them, and
// remembering what was read so that the look taken under the host lock is one readdir.
//
// Why two looks: reading a lease is open, fstat, pread, a JSON parse and an flock probe; with 64
// leases that is hundreds of system calls, and every launch on the host waits while one holds
// the lock. Select-and-reserve therefore reads every file before the lock, and under the lock
// only lists the names again: a name still there with the same inode is the same file (a lease
// file is never rewritten while it has a lease's name: it is published, and replaced by
// HeldLease::reassign, by rename; a released lease's inode may be rewritten as another lease, but
// only under another, fresh name — see PreparedLeaseInode), so its record is reused; a new or
// replaced name is read (or, new, charged from its name); a name gone is dropped. A lease that
// died between the two looks is still counted — it only errs on the safe side.
#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <utility>

#include "lease/internal.hpp"

namespace gpuslot {
namespace lease_internal {
namespace {

struct ReadOutcome {
  std::optional<LeaseRecord> record;  // live, well-formed and owned by the uid it claims
  bool gone = false;                  // no such file any more: nothing settled about this name
  int fd = -1;                        // with a record: the file, still open (the caller closes it)
  ino_t inode = 0;                    // with a record: its inode
};

// Reads one lease file defensively. No record (with a warning where useful) for anything that is
// not a live, well-formed lease owned by the uid it claims.
// `name` is looked up in `directory_fd` (one path component, not the whole path each time);
// `path` is the same file's full name, for messages and the record.
ReadOutcome read_lease(int directory_fd, const std::string& name, const std::string& path,
                       std::vector<std::string>* warnings) {
  auto warn = [&](const std::string& why) {
    if (warnings != nullptr) warnings->push_back("ignoring lease file " + path + ": " + why);
  };
  // A holder may replace its file (HeldLease::reassign) while we read it: the old inode's lock is
  // dropped only after the new one, already locked, has been renamed over it. So an unlocked file
  // that is no longer the one the name points to is not dead but replaced: read the name again.
  // A dead holder cannot replace its file, so a file replaced on every try has a live holder.
  constexpr int kReadsOfAReplacedFile = 4;
  for (int attempt = 1;; ++attempt) {
    const int fd = ::openat(directory_fd, name.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
      if (errno == ELOOP) {
        warn("it is a symlink");
        return {};
      }
      return {std::nullopt, true};  // ENOENT: released while we listed the directory
    }
    // Open until the end, also while the name is compared with it below: a closed inode can be
    // freed and its number reused at once by the holder's next replacement file, which would look
    // the same.
    struct CloseUnlessKept {
      int fd;
      ~CloseUnlessKept() { if (fd >= 0) ::close(fd); }
    } file{fd};
    struct stat info {};
    if (::fstat(fd, &info) != 0 || !S_ISREG(info.st_mode) || (info.st_mode & (S_IWGRP | S_IWOTH)) != 0 ||
        info.st_size > 65536) {
      warn("not a regular file, group/world-writable, or too large");
      return {};
    }
    std::string text(std::size_t(info.st_size), '\0');
    const ssize_t n = ::pread(fd, text.data(), text.size(), 0);
    text.resize(n > 0 ? std::size_t(n) : 0);
    auto record = from_json_text(text);
    const bool locked = is_locked_by_someone(fd);
    if (!record || !is_named_for(name, record->id)) {
      // Released leases' inodes are reused (PreparedLeaseInode): one opened under its old name
      // may already hold, or be in the middle of being given, another lease's text. The name has
      // moved on then; only a file still under this name is what the name says.
      struct stat now {};
      if (::fstatat(directory_fd, name.c_str(), &now, AT_SYMLINK_NOFOLLOW) != 0) return {std::nullopt, errno == ENOENT};
      if ((now.st_ino != info.st_ino || now.st_dev != info.st_dev) && attempt < kReadsOfAReplacedFile) continue;
      // Replaced on every try: judged by its text below, as any file (counted if it is a lease).
    }
    if (!record) {
      warn(record.error().message);
      return {};
    }
    if (record->uid != info.st_uid) {
      warn("it claims uid " + std::to_string(record->uid) + " but is owned by uid " + std::to_string(info.st_uid));
      return {};
    }
    bool live = record->expires_at_ms ? now_ms() < *record->expires_at_ms : locked;
    if (!live && !record->expires_at_ms) {
      // Checked after the lock probe: if the name still points to the inode found unlocked, its
      // holder let go without replacing it, i.e. died (release() renames or unlinks before it
      // unlocks).
      struct stat now {};
      if (::fstatat(directory_fd, name.c_str(), &now, AT_SYMLINK_NOFOLLOW) != 0) return {std::nullopt, errno == ENOENT};
      if (now.st_ino != info.st_ino || now.st_dev != info.st_dev) {
        if (attempt < kReadsOfAReplacedFile) continue;
        live = true;  // replaced on every try: its holder is alive and busy with it
      }
    }
    if (!live) {
      ::unlinkat(directory_fd, name.c_str(), 0);  // our own or root's to clean; the sticky bit refuses others, harmlessly
      return {};
    }
    record->path = path;
    ReadOutcome outcome{std::move(record).value(), false, fd, info.st_ino};
    file.fd = -1;
    return outcome;
  }
}

bool is_lease_file_name(std::string_view name) {
  return name.size() >= 11 && name.substr(0, 6) == "lease-" && name.substr(name.size() - 5) == ".json";
}

// Open lease files one scan keeps, at most: a file descriptor each, and the process may have
// others to open. Past this, live leases are read again under the lock instead.
constexpr std::size_t kMostPinnedFiles = 256;

}  // namespace

LeaseScan::Seen::~Seen() {
  if (pin >= 0) ::close(pin);
}

LeaseScan::Seen::Seen(Seen&& other) noexcept
    : inode(other.inode), record(std::move(other.record)), pin(std::exchange(other.pin, -1)), listed_in(other.listed_in) {}

namespace {

// Adds what a charged name reserves to `charged`, if every GPU it names is in `snapshot` at that
// index (else false: the file is read instead). `tags`: uuid_tag of each of the snapshot's GPUs,
// filled on first use.
bool charge_by_name(std::string_view name, const Snapshot& snapshot, std::vector<std::string>& tags,
                    OutstandingReservations& charged) {
  const auto charge = charge_from_name(name);
  if (!charge) return false;
  if (tags.empty()) {
    for (const auto& gpu : snapshot.gpus) tags.push_back(gpu.uuid.empty() ? std::string() : uuid_tag(gpu.uuid));
  }
  for (std::size_t i = 0; i < charge->gpu_count; ++i) {
    const auto [index, tag] = charge->gpus[i];
    // Not the GPU the lease was taken on (or none at that index).
    if (index >= snapshot.gpus.size() || snapshot.gpus[index].nvml_index != index || tags[index].empty() || tags[index] != tag) {
      return false;
    }
  }
  for (std::size_t i = 0; i < charge->gpu_count; ++i) {
    auto& total = charged[charge->gpus[i].first];
    total = add_saturating(total, charge->reserved_bytes);
  }
  return true;
}

}  // namespace

bool LeaseScan::refresh(std::vector<std::string>* warnings, const Snapshot* published_after) {
  DIR* dir = ::opendir(directory_.c_str());
  if (dir == nullptr) {
    seen_.clear();
    pinned_ = 0;
    return false;
  }
  ++generation_;
  charged_by_name_.clear();
  const std::string legacy_spares = legacy_spare_prefix(::geteuid());
  int legacy_deletions = 0;
  std::vector<std::string> tags;
  while (const dirent* entry = ::readdir(dir)) {
    const std::string_view name = entry->d_name;
    if (name[0] == '.') {
      // This user's spares as earlier versions kept them (spares live in spare_directory now):
      // deleted by the look before the lock, a few per look (another user can plant any number
      // of such names, which the sticky bit keeps us from deleting). None is a lease's file.
      if (published_after == nullptr && legacy_deletions < 8 && name.substr(0, legacy_spares.size()) == legacy_spares) {
        ++legacy_deletions;
        ::unlinkat(::dirfd(dir), entry->d_name, 0);
      }
      continue;
    }
    if (!is_lease_file_name(name)) continue;
    const ino_t inode = entry->d_ino;
    // The same name with the same inode is the same file — for a live lease because this scan
    // still holds it open, so its inode number cannot have been reused by a new file, and a lease
    // never takes one of its own former inodes back (HeldLease::reassign). A name
    // settled as not a lease (dead, corrupt, unsafe) is trusted by its inode alone: only a live
    // holder replaces its file, and lease ids are never reused. Inode 0: the file system does not
    // say, so read again rather than guess.
    bool known = false;
    if (auto it = seen_.find(name); it != seen_.end()) {
      if (inode != 0 && it->second.inode == inode && (it->second.pin >= 0 || !it->second.record)) {
        it->second.listed_in = generation_;
        continue;
      }
      known = true;  // replaced (HeldLease::reassign): read, so that its new holder's memory is credited
      if (it->second.pin >= 0) --pinned_;
      seen_.erase(it);
    }
    if (!known && published_after != nullptr && charge_by_name(name, *published_after, tags, charged_by_name_)) {
      ++names_charged_;
      continue;
    }
    const std::string path = directory_ + "/" + std::string(name);
    ++files_read_;
    ReadOutcome outcome = read_lease(::dirfd(dir), std::string(name), path, warnings);
    if (outcome.gone) continue;
    Seen seen(inode, std::move(outcome.record));
    seen.listed_in = generation_;
    if (outcome.fd >= 0) {
      // Kept only when it is the file the listing named (not one that replaced it meanwhile).
      if (outcome.inode == inode && pinned_ < kMostPinnedFiles) {
        seen.pin = outcome.fd;
        ++pinned_;
      } else {
        ::close(outcome.fd);
      }
    }
    seen_.emplace(std::string(name), std::move(seen));
  }
  ::closedir(dir);
  std::erase_if(seen_, [this](const auto& entry) {  // names no longer listed; closes their files
    if (entry.second.listed_in == generation_) return false;
    if (entry.second.pin >= 0) --pinned_;
    return true;
  });
  return true;
}

std::vector<ino_t> LeaseScan::inodes() const {
  std::vector<ino_t> listed;
  listed.reserve(seen_.size());
  for (const auto& [name, seen] : seen_) listed.push_back(seen.inode);
  std::sort(listed.begin(), listed.end());
  return listed;
}

std::vector<LeaseRecord*> LeaseScan::live_records() {
  std::vector<LeaseRecord*> leases;
  leases.reserve(seen_.size());
  for (auto& [name, seen] : seen_) {
    if (seen.record) leases.push_back(&*seen.record);
  }
  std::stable_sort(leases.begin(), leases.end(),
                   [](const LeaseRecord* a, const LeaseRecord* b) { return a->taken_at_ms < b->taken_at_ms; });
  return leases;
}

std::vector<LeaseRecord> LeaseScan::live() {
  std::vector<LeaseRecord> leases;
  for (const LeaseRecord* record : live_records()) leases.push_back(*record);
  return leases;
}

}  // namespace lease_internal
}  // namespace gpuslot
