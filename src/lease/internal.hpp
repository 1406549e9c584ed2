// lease/internal.hpp — pieces of the lease layer shared between its files.
#pragma once

#include <sys/types.h>

#include <array>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

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

// A lease's file name: "lease-<id>.json", and where the record has GPUs, what it reserves too:
// "lease-<id>.r<bytes on each GPU>.g<NVML index>-<uuid_tag>[.g…].json". That lets a launch
// charge a lease published while it waited for the host lock from the name its readdir already
// gave, without opening the file (see LeaseScan::refresh). Names longer than
// kLongestChargedName (many GPUs) fall back to the plain form. A name is trusted like a file's
// text: whoever creates a name (any user can, in the sticky state directory) can only add to what
// is counted, and only for the moment until a later look reads the file; nobody but its owner
// can rename or remove it.
inline constexpr std::size_t kLongestChargedName = 240;
std::string lease_file_name(const LeaseRecord& record);
// 8 hex digits naming a GPU UUID in a file name (a check that the index still means that GPU).
std::string uuid_tag(std::string_view uuid);
struct NamedCharge {
  static constexpr std::size_t kMostGpus = 24;  // more than a name of kLongestChargedName can hold
  std::string_view id;                          // these views are into the name parsed
  std::uint64_t reserved_bytes = 0;
  std::size_t gpu_count = 0;
  std::array<std::pair<unsigned, std::string_view>, kMostGpus> gpus{};  // NVML index, uuid_tag
};
// What a charged name says; nullopt for a plain or malformed name.
std::optional<NamedCharge> charge_from_name(std::string_view name);
// Whether `name` is the file name of lease `id`, in either form lease_file_name gives.
bool is_named_for(std::string_view name, std::string_view id);

// Serialises a record to its file's JSON text and back. Parsing rejects anything incomplete.
std::string to_json_text(const LeaseRecord& record);
Result<LeaseRecord> from_json_text(const std::string& text);
// from_json_text's general path: any JSON form of a lease, through nlohmann (the fast path
// `read_canonical_lease` must agree with it; tests/unit/lease checks that on mutated texts).
Result<LeaseRecord> read_lease_document(const std::string& text);
// The fast path of from_json_text: the exact compact form to_json_text writes, else nullopt
// (exposed for the test that checks it agrees with the document parser).
std::optional<LeaseRecord> read_canonical_lease(std::string_view text);

// A lease file's inode, made ready before the host lock: creating an inode is the slowest step of
// publishing a lease on some file systems (ext4 without a journal scans the inodes deleted in the
// last minutes on every create: 0.35 ms a file on these machines after a busy hour), and the lock
// should not be held for it. It is either
// - a spare: the inode of one of this user's released leases, kept under a name in the user's
//   spare directory (spare_directory) instead of being deleted, so that leases neither create
//   nor delete inodes once a user has as many spares as it holds leases at once. A spare keeps
//   that name while it serves as a lease: publishing links it under the lease's name (only the
//   state directory is changed under the host lock), and releasing unlinks the lease's name, which
//   makes it a spare again. Its link count tells which it is: 1 free, 2 a lease's file. (A
//   reassign moves a spare over the lease's name instead; that lease's release moves it back.) Or
// - an O_TMPFILE file, which has no name.
// Either way no reader looks at it until write_lease_file names it, complete and locked; it is
// 0644 and flock'ed here (a spare still holds its old text, overwritten when published). An
// unused O_TMPFILE file vanishes when closed; an unused spare stays a spare. Empty (fd -1) where
// neither can be had (no O_TMPFILE on this file system).
class PreparedLeaseInode {
 public:
  PreparedLeaseInode() = default;
  // Lists this user's spares in `directory` (one readdir of the spare directory) and claims one,
  // a few tried at random. `or_tmpfile` = false: a spare or nothing. `excluded`: inodes never to
  // take as spares, e.g. those the state directory lists as leases, which are then not even
  // opened (sorted saves a copy).
  explicit PreparedLeaseInode(const std::string& directory, bool or_tmpfile = true, const std::vector<ino_t>& excluded = {});
  PreparedLeaseInode(PreparedLeaseInode&& other) noexcept
      : fd_(std::exchange(other.fd_, -1)), spare_(std::move(other.spare_)), spare_size_(other.spare_size_) {}
  PreparedLeaseInode& operator=(PreparedLeaseInode&& other) noexcept;
  PreparedLeaseInode(const PreparedLeaseInode&) = delete;
  PreparedLeaseInode& operator=(const PreparedLeaseInode&) = delete;
  ~PreparedLeaseInode();
  // The fd, now the caller's to close, and the spare's path ("" if O_TMPFILE).
  std::pair<int, std::string> take() {
    return {std::exchange(fd_, -1), std::exchange(spare_, std::string())};
  }
  bool empty() const { return fd_ < 0; }
  bool is_spare() const { return fd_ >= 0 && !spare_.empty(); }
  // A spare's size when claimed (its old text's): write_lease_file pads a shorter text to it with
  // spaces rather than truncating the file under the host lock.
  std::size_t spare_size() const { return spare_size_; }

 private:
  int fd_ = -1;
  std::string spare_;
  std::size_t spare_size_ = 0;
};

// `uid`'s spare directory: "<directory>/.spares-<uid>", 0700 and owned by `uid`, so that nobody
// else can name, open or lock a spare, and every launch of every other user lists the state
// directory without them. Anyone can create a name in the sticky state directory, so it is used
// only where it is a directory (not a symlink) owned by `uid`; where another user took the name,
// the launches of `uid` work without spares (a new inode per lease), nothing worse.
std::string spare_directory(const std::string& directory, uid_t uid);
// Opens it (creating it first with `create`): an fd, or -1 where it is missing or not as above.
int open_spare_directory(const std::string& directory, uid_t uid, bool create);
// A fresh name for a spare in it.
std::string new_spare_name();
// Gives the lease file at `lease_path` a name in this user's spare directory: moves it there
// (`move`), or links it there and leaves the lease's name. False where that cannot be done.
bool keep_as_spare(const std::string& lease_path, bool move);
// The names in `uid`'s spare directory (one readdir; -1 directory fd: none), but those of the
// `excluded` inodes (sorted). Past kMostSpares of them, trim_spares deletes a few.
std::vector<std::string> list_spares(int spare_directory_fd, const std::vector<ino_t>& excluded);
inline constexpr std::size_t kMostSpares = 256;
void trim_spares(int spare_directory_fd, std::vector<std::string>& spares);
// Where earlier versions kept a user's spares: ".spare-<uid>-<hex>" in the state directory
// itself. LeaseScan deletes this user's on sight.
std::string legacy_spare_prefix(uid_t uid);

// Writes a lease file atomically (temp file + rename, replacing any file of the same id) and
// returns its fd, flock'ed exclusively *before* it becomes visible, so no reader can ever see it
// unlocked and think its holder dead. Errc::state on any failure (full disk, permissions), with
// "cannot <step> lease file in <directory>: <reason>", leaving the temp file removed and any
// previous file of that id in place.
// `prepared`: an inode made ready by PreparedLeaseInode (a spare, or nameless O_TMPFILE), taken
// over: it is filled and renamed or linked into place instead of creating a file now. Where that
// cannot be done (no O_TMPFILE on this file system, no /proc), the temp file + rename path runs.
// `replace`: the name may exist and is replaced (HeldLease::reassign; only a spare or the temp
// file can replace a name).
Result<int> write_lease_file(const std::string& directory, const LeaseRecord& record, bool lock_it,
                             PreparedLeaseInode* prepared = nullptr, bool replace = false);


// True if some process holds an flock on `fd`'s file (probe with a shared, non-blocking lock).
bool is_locked_by_someone(int fd);

// Current Unix time in milliseconds.
std::int64_t now_ms();

// What the lease accounting needs from /proc — holders' start times, GPU processes' parents and
// sessions — each read once (one /proc/<pid>/stat read gives all three) and then remembered,
// including "no such process". One instance lives for one select-and-reserve step, so facts are
// at most a few milliseconds old when reused (see reserve_locked for why that is safe).
class ProcessFacts {
 public:
  std::optional<unsigned long long> start_ticks(pid_t pid);
  std::optional<pid_t> parent(pid_t pid);
  std::optional<pid_t> session(pid_t pid);
  // How many /proc reads this instance made (tests check the locked pass makes none).
  std::size_t proc_reads() const { return proc_reads_; }

 private:
  struct Fields {
    pid_t parent = 0;
    pid_t session = 0;
    unsigned long long start_ticks = 0;
  };
  const std::optional<Fields>& fields_of(pid_t pid);
  std::unordered_map<pid_t, std::optional<Fields>> facts_;
  std::size_t proc_reads_ = 0;
};

// Outstanding bytes per NVML index, filling each record's in_use_bytes (Ledger::outstanding with
// the /proc facts supplied by the caller).
OutstandingReservations charge_leases(const std::vector<LeaseRecord*>& leases, const Snapshot& snapshot, ProcessFacts& facts);
OutstandingReservations charge_leases(std::vector<LeaseRecord>& leases, const Snapshot& snapshot, ProcessFacts& facts);

// The lease files of a state directory, remembered between two looks so that the second one only
// reads what changed. Select-and-reserve looks once before the host lock (reading every file) and
// once under it: one readdir, and only names not seen before — or whose inode changed, i.e. that
// were replaced by HeldLease::reassign — are read. Names no longer listed are forgotten; nothing
// is used that the latest look did not list. Live leases' files stay open until the scan is
// destroyed (at most 256 of them), which, with a lease never taking back an inode of its own,
// is what makes "same name, same inode" mean "same file".
class LeaseScan {
 public:
  explicit LeaseScan(std::string directory) : directory_(std::move(directory)) {}
  LeaseScan(LeaseScan&&) = default;
  LeaseScan& operator=(LeaseScan&&) = default;
  LeaseScan(const LeaseScan&) = delete;
  LeaseScan& operator=(const LeaseScan&) = delete;
  // Lists the directory and reads the files that need it (see above). Warnings (corrupt or
  // unsafe files) are given only for files read by this call, so one file is warned about once.
  // Dead holders' and expired leases are removed where this user may.
  // `published_after`: a snapshot taken before this scan's previous refresh. A name that refresh
  // did not list is a lease taken after that snapshot, for memory its holder has yet to use, so
  // it is charged in full: when its name says what it reserves (lease_file_name) on GPUs the
  // snapshot still has at those indices, that goes to charged_by_name() and the file is not
  // opened. Neither is its holder asked for, nor whether it is alive. Both err on the safe side
  // only: a lease that just died still counts (as above), and a holder that already used a GPU
  // when it took another lease there has that memory counted twice, until a later look reads
  // the file. Such names are not remembered: a later refresh reads them. A name listed before
  // with another inode (replaced by HeldLease::reassign) is read, so its new holder is credited.
  // False (and nothing remembered) if the directory cannot be listed.
  bool refresh(std::vector<std::string>* warnings, const Snapshot* published_after = nullptr);
  // What the latest refresh charged from names, by NVML index: bytes, in full.
  const OutstandingReservations& charged_by_name() const { return charged_by_name_; }
  // The inodes the latest refresh listed under lease names, sorted.
  std::vector<ino_t> inodes() const;

  // The live leases as of the latest refresh, oldest first: copies, or the scan's own records
  // (valid until the next refresh; charge_leases fills their in_use_bytes).
  std::vector<LeaseRecord> live();
  std::vector<LeaseRecord*> live_records();
  // Lease files read so far, and leases charged from their names (tests check what the locked
  // pass reads).
  std::size_t files_read() const { return files_read_; }
  std::size_t names_charged() const { return names_charged_; }

 private:
  struct Seen {
    Seen(ino_t listed_inode, std::optional<LeaseRecord> read) : inode(listed_inode), record(std::move(read)) {}
    Seen(Seen&& other) noexcept;
    Seen& operator=(Seen&&) = delete;
    ~Seen();
    ino_t inode = 0;                    // as the listing gave it
    std::optional<LeaseRecord> record;  // nullopt: dead, corrupt or unsafe — settled, not re-read
    int pin = -1;                       // a live lease's file, kept open so its inode stays its own
    std::uint64_t listed_in = 0;        // the refresh that last listed this name
  };
  std::string directory_;
  std::map<std::string, Seen, std::less<>> seen_;  // by file name
  std::uint64_t generation_ = 0;                   // refreshes so far
  std::size_t pinned_ = 0;
  std::size_t files_read_ = 0;
  std::size_t names_charged_ = 0;
  OutstandingReservations charged_by_name_;
};

// What select-and-reserve reads before the host lock, against the snapshot it will decide on.
struct LedgerView {
  LeaseScan scan;
  ProcessFacts facts;
  PreparedLeaseInode inode;  // for the lease this step may publish (made by view_before_lock)
  bool scanned_after_snapshot = false;  // view_before_lock read the leases after the snapshot it decides on
};

// Reads every lease file and the /proc facts their accounting needs (by charging them against
// `snapshot` once). Call after taking the snapshot and before the host lock.
LedgerView view_before_lock(const std::string& directory, const Snapshot& snapshot, std::vector<std::string>* warnings);

// Who holds a lease about to be taken (id, pid, start time, uid, user, command): read from /proc
// and /etc/passwd, so it is prepared before the host lock. With request.holder_pending the pid
// and start time are 0.
LeaseRecord holder_identity(const ReserveRequest& request);

// Select-and-reserve with the host lock already held, on a snapshot that may predate the lock.
// `view` is refreshed under the lock first (one readdir; see LeaseScan); a default-constructed
// view (LedgerView{LeaseScan(directory), {}}) reads everything under the lock instead.
// `take` = false only decides (to describe why a waiter waits) and writes nothing.
Result<Reservation> reserve_locked(Ledger& ledger, const ReserveRequest& request, const LeaseRecord& identity,
                                   Snapshot snapshot, const VisibilityOf& visibility_of, bool take,
                                   LedgerView& view, std::vector<std::string>* warnings);

// a + b, or the largest value where that overflows: a lease file claiming absurd sizes must not
// wrap a GPU's total round to a small number.
inline std::uint64_t add_saturating(std::uint64_t a, std::uint64_t b) { return a > UINT64_MAX - b ? UINT64_MAX : a + b; }

// 32 random bits (getrandom; std::random_device only where that fails).
std::uint32_t random_u32();
// New random lease id: "<pid>-<8 hex>".
std::string new_lease_id();

}  // namespace gpuslot::lease_internal
