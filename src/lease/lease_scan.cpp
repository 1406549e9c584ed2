// lease_scan.cpp — reading the lease files of the state directory without trusting them, and
// remembering what was read so that the look taken under the host lock is one readdir.
//
// Why two looks: reading a lease is open, fstat, pread, a JSON parse and an flock probe; with 64
// leases that is hundreds of system calls, and every launch on the host waits while one holds
// the lock. Select-and-reserve therefore reads every file before the lock, and under the lock
// only lists the names again: a name still there with the same inode is the same file (a lease
// file is never rewritten in place: it is published, and replaced by HeldLease::reassign, by
// rename), so its record is reused; a new or replaced name is read; a name gone is dropped.
// A lease that died between the two looks is still counted — it only errs on the safe side.
#include <dirent.h>
#include <fcntl.h>
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
    // Open until the end, also while the name is compared with it below: a closed inode's number
    // can be reused at once by the holder's next replacement file, which would look the same.
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
      // holder let go without replacing it, i.e. died (release() unlinks before it unlocks).
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

bool is_lease_file_name(const std::string& name) {
  return name.rfind("lease-", 0) == 0 && name.size() >= 11 && name.compare(name.size() - 5, 5, ".json") == 0;
}

// Open lease files one scan keeps, at most: a file descriptor each, and the process may have
// others to open. Past this, live leases are read again under the lock instead.
constexpr std::size_t kMostPinnedFiles = 256;

}  // namespace

LeaseScan::Seen::~Seen() {
  if (pin >= 0) ::close(pin);
}

LeaseScan::Seen::Seen(Seen&& other) noexcept
    : inode(other.inode), record(std::move(other.record)), pin(std::exchange(other.pin, -1)) {}

void LeaseScan::refresh(std::vector<std::string>* warnings) {
  std::map<std::string, Seen> listed;
  DIR* dir = ::opendir(directory_.c_str());
  if (dir == nullptr) {
    seen_.clear();
    pinned_ = 0;
    return;
  }
  while (const dirent* entry = ::readdir(dir)) {
    std::string name = entry->d_name;
    if (!is_lease_file_name(name)) continue;
    const ino_t inode = entry->d_ino;
    // The same name with the same inode is the same file — for a live lease because this scan
    // still holds it open, so its inode number cannot have been reused by a replacement. A name
    // settled as not a lease (dead, corrupt, unsafe) is trusted by its inode alone: only a live
    // holder replaces its file, and lease ids are never reused. Inode 0: the file system does not
    // say, so read again rather than guess.
    if (auto it = seen_.find(name);
        it != seen_.end() && inode != 0 && it->second.inode == inode && (it->second.pin >= 0 || !it->second.record)) {
      listed.emplace(std::move(name), std::move(it->second));
      continue;
    }
    ++files_read_;
    ReadOutcome outcome = read_lease(::dirfd(dir), name, directory_ + "/" + name, warnings);
    if (outcome.gone) continue;
    Seen seen(inode, std::move(outcome.record));
    if (outcome.fd >= 0) {
      // Kept only when it is the file the listing named (not one that replaced it meanwhile).
      if (outcome.inode == inode && pinned_ < kMostPinnedFiles) {
        seen.pin = outcome.fd;
        ++pinned_;
      } else {
        ::close(outcome.fd);
      }
    }
    listed.emplace(std::move(name), std::move(seen));
  }
  ::closedir(dir);
  seen_ = std::move(listed);  // closes the files of names no longer listed
  pinned_ = 0;
  for (const auto& [name, seen] : seen_) pinned_ += seen.pin >= 0 ? 1 : 0;
}
std::vector<LeaseRecord> LeaseScan::live() const {
  std::vector<LeaseRecord> leases;
  for (const auto& [name, seen] : seen_) {
    if (seen.record) leases.push_back(*seen.record);
  }
  std::stable_sort(leases.begin(), leases.end(),
                   [](const LeaseRecord& a, const LeaseRecord& b) { return a.taken_at_ms < b.taken_at_ms; });
  return leases;
}

}  // namespace lease_internal
}  // namespace gpuslot
