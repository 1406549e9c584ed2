// lease_file.cpp — one lease, one file: how it is written so that no reader ever sees it
// half-written or unlocked, and how it is read back without trusting it.
#include <fcntl.h>
#include <pthread.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <dirent.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <limits>
#include <mutex>
#include <string_view>
#include <nlohmann/json.hpp>
#include <random>

#include "common/fd_io.hpp"
#include "common/utf8.hpp"
#include "lease/internal.hpp"

namespace gpuslot {
namespace lease_internal {

std::int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::uint32_t random_u32() {
  // getrandom(2), not std::random_device: constructing one probes the CPU with cpuid, which traps
  // to the hypervisor in a VM (40 µs measured on KVM) — paid by every launch.
  std::uint32_t random = 0;
  if (::getrandom(&random, sizeof random, GRND_NONBLOCK) != ssize_t(sizeof random)) {
    std::random_device device;  // no getrandom (very old kernel) or not seeded yet
    random = std::uint32_t(device());
  }
  return random;
}

std::string new_lease_id() {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%d-%08x", int(::getpid()), unsigned(random_u32()));
  return buffer;
}

std::string uuid_tag(std::string_view uuid) {
  std::uint32_t hash = 2166136261u;  // FNV-1a: a short, stable tag, not a secret
  for (const char c : uuid) hash = (hash ^ std::uint8_t(c)) * 16777619u;
  char buffer[9];
  std::snprintf(buffer, sizeof buffer, "%08x", unsigned(hash));
  return buffer;
}

std::string lease_file_name(const LeaseRecord& record) {
  std::string name = "lease-" + record.id;
  const std::string plain = name + ".json";
  if (record.gpu_uuids.empty() || record.gpu_uuids.size() != record.nvml_indices.size()) return plain;
  name += ".r" + std::to_string(record.reserved_bytes);
  for (std::size_t i = 0; i < record.gpu_uuids.size(); ++i) {
    name += ".g" + std::to_string(record.nvml_indices[i]) + "-" + uuid_tag(record.gpu_uuids[i]);
  }
  name += ".json";
  return name.size() <= kLongestChargedName ? name : plain;
}

namespace {

// Digits only, no sign, no leading zero unless "0", and within `most`.
bool parse_count(std::string_view digits, std::uint64_t most, std::uint64_t& value) {
  if (digits.empty() || digits.size() > 20 || (digits.size() > 1 && digits[0] == '0')) return false;
  value = 0;
  for (const char c : digits) {
    if (c < '0' || c > '9') return false;
    const std::uint64_t digit = std::uint64_t(c - '0');
    if (value > (most - digit) / 10) return false;
    value = value * 10 + digit;
  }
  return true;
}

}  // namespace

std::optional<NamedCharge> charge_from_name(std::string_view name) {
  constexpr std::string_view kPrefix = "lease-", kSuffix = ".json";
  if (name.size() <= kPrefix.size() + kSuffix.size() || name.substr(0, kPrefix.size()) != kPrefix ||
      name.substr(name.size() - kSuffix.size()) != kSuffix) {
    return std::nullopt;
  }
  std::string_view rest = name.substr(kPrefix.size(), name.size() - kPrefix.size() - kSuffix.size());
  auto next_part = [&rest]() {
    const std::size_t dot = rest.find('.');
    const std::string_view part = rest.substr(0, dot);
    rest = dot == std::string_view::npos ? std::string_view() : rest.substr(dot + 1);
    return part;
  };
  NamedCharge charge;
  charge.id = next_part();
  const std::string_view reserved = next_part();
  if (charge.id.empty() || reserved.size() < 2 || reserved[0] != 'r' ||
      !parse_count(reserved.substr(1), std::numeric_limits<std::uint64_t>::max(), charge.reserved_bytes)) {
    return std::nullopt;
  }
  while (!rest.empty()) {
    const std::string_view gpu = next_part();
    const std::size_t dash = gpu.find('-');
    std::uint64_t index = 0;
    if (charge.gpu_count == NamedCharge::kMostGpus || gpu.size() < 2 || gpu[0] != 'g' ||
        dash == std::string_view::npos || gpu.size() - dash - 1 != 8 ||
        !parse_count(gpu.substr(1, dash - 1), std::numeric_limits<unsigned>::max(), index)) {
      return std::nullopt;
    }
    const std::string_view tag = gpu.substr(dash + 1);
    if (tag.find_first_not_of("0123456789abcdef") != std::string_view::npos) return std::nullopt;
    charge.gpus[charge.gpu_count++] = {unsigned(index), tag};
  }
  if (charge.gpu_count == 0) return std::nullopt;
  return charge;
}

bool is_named_for(std::string_view name, std::string_view id) {
  constexpr std::string_view kPrefix = "lease-", kSuffix = ".json";
  if (name.size() == kPrefix.size() + id.size() + kSuffix.size() && name.substr(0, kPrefix.size()) == kPrefix &&
      name.substr(kPrefix.size(), id.size()) == id && name.substr(kPrefix.size() + id.size()) == kSuffix) {
    return true;
  }
  const auto charge = charge_from_name(name);
  return charge && charge->id == id;
}

namespace {

// Appends `text` as a JSON string: `"`, `\` and control characters escaped as nlohmann's dump
// escapes them, valid UTF-8 kept as it is, and each invalid byte sequence (a command line is
// whatever bytes its argv held) replaced by U+FFFD, so a lease is always valid JSON.
void append_json_string(std::string& out, std::string_view text) {
  out += '"';
  const auto* bytes = reinterpret_cast<const unsigned char*>(text.data());
  const std::size_t size = text.size();
  for (std::size_t i = 0; i < size;) {
    const unsigned char byte = bytes[i];
    if (byte < 0x80) {
      switch (byte) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\b': out += "\\b"; break;
        case '\f': out += "\\f"; break;
        case '\n': out += "\\n"; break;
        case '\r': out += "\\r"; break;
        case '\t': out += "\\t"; break;
        default:
          if (byte < 0x20) {
            char escaped[8];
            std::snprintf(escaped, sizeof escaped, "\\u%04x", unsigned(byte));
            out += escaped;
          } else {
            out += char(byte);
          }
      }
      ++i;
      continue;
    }
    std::size_t invalid = 1;
    if (const std::size_t length = utf8::sequence_length(text.substr(i), &invalid); length > 0) {
      out.append(text.data() + i, length);
      i += length;
    } else {
      out += "\xef\xbf\xbd";  // U+FFFD for the longest ill-formed start, then on after it
      i += invalid;
    }
  }
  out += '"';
}

template <class Integer>
void append_json_field(std::string& out, std::string_view key, Integer value) {
  out += '"';
  out += key;
  out += "\":";
  out += std::to_string(value);
}

template <class Items, class AppendItem>
void append_json_array(std::string& out, const Items& items, AppendItem append_item) {
  out += '[';
  for (std::size_t i = 0; i < items.size(); ++i) {
    if (i > 0) out += ',';
    append_item(items[i]);
  }
  out += ']';
}

}  // namespace

std::string to_json_text(const LeaseRecord& record) {
  // The compact form nlohmann's dump gives (keys sorted, no spaces), written by hand: this runs
  // under the host lock on every launch. tests/unit/lease checks it byte for byte against
  // nlohmann for valid text.
  std::string out;
  out.reserve(320 + record.command.size() + 48 * record.gpu_uuids.size());
  out += "{\"command\":";
  append_json_string(out, record.command);
  out += ",\"expires_at_ms\":";
  out += record.expires_at_ms ? std::to_string(*record.expires_at_ms) : std::string("null");
  out += ',';
  append_json_field(out, "format", 1);
  out += ",\"gpu_uuids\":";
  append_json_array(out, record.gpu_uuids, [&](const std::string& uuid) { append_json_string(out, uuid); });
  out += ',';
  append_json_field(out, "holder_pid", record.holder_pid);
  out += ',';
  append_json_field(out, "holder_session", record.holder_session);
  out += ',';
  append_json_field(out, "holder_start_ticks", record.holder_start_ticks);
  out += ",\"id\":";
  append_json_string(out, record.id);
  out += ",\"nvml_indices\":";
  append_json_array(out, record.nvml_indices, [&](unsigned index) { out += std::to_string(index); });
  out += ',';
  append_json_field(out, "reserved_bytes", record.reserved_bytes);
  out += ',';
  append_json_field(out, "taken_at_ms", record.taken_at_ms);
  out += ',';
  append_json_field(out, "uid", record.uid);
  out += ",\"user\":";
  append_json_string(out, record.user);
  out += "}\n";
  return out;
}

namespace {

// One pass over the compact form to_json_text writes (nlohmann's dump: no whitespace, keys
// sorted, ASCII here) — an object whose values are integers, null, escape-free ASCII strings or
// flat arrays of those. Anything else (an escape, a byte over 0x7f, a space, a float, an unknown
// or repeated key, a number out of its field's range, a missing field) gives up with nullopt and
// the document parser reads the text, so results never differ from it, only the time: every
// launch reads every lease file, and the document parser was half of the ~12 µs each costs.
class CanonicalLease {
 public:
  explicit CanonicalLease(std::string_view text) : at_(text.data()), end_(text.data() + text.size()) {}

  std::optional<LeaseRecord> read() {
    LeaseRecord record;
    bool seen[kFieldCount] = {};
    if (!take('{')) return std::nullopt;
    do {
      std::string_view key;
      if (!string(key) || !take(':')) return std::nullopt;
      const int field = field_of(key);
      if (field < 0 || seen[field]) return std::nullopt;
      seen[field] = true;
      if (!value(Field(field), record)) return std::nullopt;
    } while (take(','));
    if (!take('}')) return std::nullopt;
    while (at_ < end_ && (*at_ == '\n' || *at_ == ' ' || *at_ == '\t' || *at_ == '\r')) ++at_;
    if (at_ != end_ || format_ != 1) return std::nullopt;
    for (int field = 0; field < kHolderSession; ++field) {
      if (!seen[field]) return std::nullopt;
    }
    return record;
  }

 private:
  enum Field {
    kFormat, kId, kHolderPid, kHolderStartTicks, kUid, kUser, kGpuUuids, kNvmlIndices, kReservedBytes, kCommand,
    kTakenAtMs, kExpiresAtMs, kHolderSession, kFieldCount  // holder_session (last) is optional
  };

  static int field_of(std::string_view key) {
    static constexpr std::string_view kNames[kFieldCount] = {
        "format", "id", "holder_pid", "holder_start_ticks", "uid", "user", "gpu_uuids", "nvml_indices",
        "reserved_bytes", "command", "taken_at_ms", "expires_at_ms", "holder_session"};
    for (int field = 0; field < kFieldCount; ++field) {
      if (key == kNames[field]) return field;
    }
    return -1;
  }

  bool value(Field field, LeaseRecord& record) {
    switch (field) {
      case kFormat: return integer(format_, 1, 1);
      case kId: return string(record.id);
      case kHolderPid: return integer(record.holder_pid);
      case kHolderStartTicks: return integer(record.holder_start_ticks);
      case kUid: return integer(record.uid);
      case kUser: return string(record.user);
      case kCommand: return string(record.command);
      case kReservedBytes: return integer(record.reserved_bytes);
      case kTakenAtMs: return integer(record.taken_at_ms);
      case kHolderSession: return integer(record.holder_session);
      case kExpiresAtMs:
        if (literal("null")) return true;
        record.expires_at_ms.emplace();
        return integer(*record.expires_at_ms);
      case kGpuUuids:
        return array([&] { return string(record.gpu_uuids.emplace_back()); });
      case kNvmlIndices:
        return array([&] { return integer(record.nvml_indices.emplace_back()); });
      case kFieldCount: break;
    }
    return false;
  }

  template <class Element>
  bool array(Element element) {
    if (!take('[')) return false;
    if (take(']')) return true;
    do {
      if (!element()) return false;
    } while (take(','));
    return take(']');
  }

  bool string(std::string_view& out) {
    if (!take('"')) return false;
    const char* start = at_;
    while (at_ < end_ && *at_ != '"') {
      const auto byte = static_cast<unsigned char>(*at_);
      if (byte < 0x20 || byte >= 0x7f || byte == '\\') return false;
      ++at_;
    }
    if (at_ == end_) return false;
    out = std::string_view(start, std::size_t(at_ - start));
    ++at_;
    return true;
  }
  bool string(std::string& out) {
    std::string_view view;
    if (!string(view)) return false;
    out.assign(view);
    return true;
  }

  // A JSON integer (no leading zeros, no fraction or exponent) that fits T and [low, high].
  template <class T>
  bool integer(T& out, long long low = std::numeric_limits<T>::min(),
               unsigned long long high = std::numeric_limits<T>::max()) {
    const bool negative = take('-');
    const char* start = at_;
    unsigned long long magnitude = 0;
    while (at_ < end_ && *at_ >= '0' && *at_ <= '9') {
      if (at_ - start >= 18) return false;  // beyond what the document parser keeps exact
      magnitude = magnitude * 10 + unsigned(*at_ - '0');
      ++at_;
    }
    if (at_ == start || (*start == '0' && at_ - start > 1)) return false;
    if (at_ < end_ && (*at_ == '.' || *at_ == 'e' || *at_ == 'E')) return false;
    if (negative) {
      if (magnitude == 0 || low >= 0 || magnitude > static_cast<unsigned long long>(-(low + 1)) + 1) return false;
      out = static_cast<T>(-static_cast<long long>(magnitude - 1) - 1);
      return true;
    }
    if (magnitude > high) return false;
    out = static_cast<T>(magnitude);
    return true;
  }

  bool take(char expected) {
    if (at_ < end_ && *at_ == expected) {
      ++at_;
      return true;
    }
    return false;
  }
  bool literal(std::string_view word) {
    if (std::size_t(end_ - at_) < word.size() || std::string_view(at_, word.size()) != word) return false;
    at_ += word.size();
    return true;
  }

  const char* at_;
  const char* end_;
  int format_ = 0;
};

Result<LeaseRecord> checked(LeaseRecord record) {
  // holder_pid 0 is a pending lease (ReserveRequest::holder_pending): live by its lock, no tree.
  if (record.id.empty() || record.gpu_uuids.empty() || record.holder_pid < 0) {
    return make_error(Errc::bad_input, "incomplete lease");
  }
  return record;
}

}  // namespace

std::optional<LeaseRecord> read_canonical_lease(std::string_view text) { return CanonicalLease(text).read(); }

Result<LeaseRecord> from_json_text(const std::string& text) {
  if (auto record = read_canonical_lease(text)) return checked(std::move(*record));
  return read_lease_document(text);
}

Result<LeaseRecord> read_lease_document(const std::string& text) {
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
    return checked(std::move(record));
  } catch (const std::exception& e) {
    return make_error(Errc::bad_input, std::string("not a lease: ") + e.what());
  }
}

std::string spare_directory(const std::string& directory, uid_t uid) { return directory + "/.spares-" + std::to_string(uid); }

int open_spare_directory(const std::string& directory, uid_t uid, bool create) {
  const std::string path = spare_directory(directory, uid);
  int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0 && errno == ENOENT && create) {
    // Made 0700 whatever the umask: one that took the owner's read bit would leave a directory
    // this user cannot list. Nobody else can replace a name just made in the sticky directory.
    if (::mkdir(path.c_str(), 0700) == 0) ::chmod(path.c_str(), 0700);
    fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  }
  if (fd < 0) return -1;
  struct stat info {};
  // Another user's directory under this name is not ours to use (root could open and change
  // it); our own with other bits is put right.
  if (::fstat(fd, &info) != 0 || info.st_uid != uid ||
      ((info.st_mode & 07777) != 0700 && ::fchmod(fd, 0700) != 0)) {
    ::close(fd);
    return -1;
  }
  return fd;
}

std::string new_spare_name() {
  char name[16];
  std::snprintf(name, sizeof name, "%08x", unsigned(random_u32()));
  return name;
}

std::string legacy_spare_prefix(uid_t uid) { return ".spare-" + std::to_string(uid) + "-"; }

void trim_spares(int spare_directory_fd, std::vector<std::string>& spares) {
  // At most a few at a time, so that no launch pays for many.
  for (int tries = 0; spares.size() > kMostSpares; ++tries) {
    if (tries == 8) {
      spares.resize(kMostSpares);
      break;
    }
    const int spare = ::openat(spare_directory_fd, spares.back().c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    struct stat info {};
    // Only a free spare: not one a launch has claimed, nor one serving as a lease (a second name,
    // looked at once locked: a `pick --hold` lease is published unlocked).
    if (spare >= 0 && ::flock(spare, LOCK_EX | LOCK_NB) == 0 && ::fstat(spare, &info) == 0 && info.st_nlink == 1) {
      ::unlinkat(spare_directory_fd, spares.back().c_str(), 0);
    }
    if (spare >= 0) ::close(spare);
    spares.pop_back();
  }
}

std::vector<std::string> list_spares(int spare_directory_fd, const std::vector<ino_t>& excluded) {
  std::vector<std::string> spares;
  if (spare_directory_fd < 0) return spares;
  // fdopendir takes over the descriptor it is given: a duplicate, so that the caller's stays open.
  const int listed = ::fcntl(spare_directory_fd, F_DUPFD_CLOEXEC, 0);
  DIR* dir = listed >= 0 ? ::fdopendir(listed) : nullptr;
  if (dir == nullptr) {
    if (listed >= 0) ::close(listed);
    return spares;
  }
  while (const dirent* entry = ::readdir(dir)) {
    if (entry->d_name[0] == '.') continue;
    if (!std::binary_search(excluded.begin(), excluded.end(), entry->d_ino)) spares.emplace_back(entry->d_name);
  }
  ::closedir(dir);
  trim_spares(spare_directory_fd, spares);
  return spares;
}

bool keep_as_spare(const std::string& lease_path, bool move) {
  const std::string directory = lease_path.substr(0, lease_path.rfind('/'));
  const int spares = open_spare_directory(directory, ::geteuid(), /*create=*/true);
  if (spares < 0) return false;
  const std::string name = new_spare_name();
  const bool kept = move ? ::renameat2(AT_FDCWD, lease_path.c_str(), spares, name.c_str(), RENAME_NOREPLACE) == 0
                         : ::linkat(AT_FDCWD, lease_path.c_str(), spares, name.c_str(), 0) == 0;
  ::close(spares);
  return kept;
}

namespace {

// Opens and claims one spare: a regular file of this user's with no other name (not one serving
// as a lease, nor one linked elsewhere), not claimed by another launch (flock), and still under
// that name, still with no other, once locked: another launch may have claimed and published it
// (a `pick --hold` lease is published unlocked) between our open and our lock. Not one of
// `excluded` (sorted; a lease's own former inodes, see HeldLease::reassign, whatever the listing
// said). Then 0644. -1 if any of that fails. Nobody but this user (and root) can make a name in
// the spare directory.
int claim_spare(int spare_directory_fd, const std::string& name, const std::vector<ino_t>& excluded, std::size_t& size) {
  const int fd = ::openat(spare_directory_fd, name.c_str(), O_RDWR | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) return -1;
  struct CloseUnlessKept {
    int fd;
    ~CloseUnlessKept() { if (fd >= 0) ::close(fd); }
  } file{fd};
  struct stat info {};
  if (::fstat(fd, &info) != 0 || !S_ISREG(info.st_mode) || info.st_uid != ::geteuid() || info.st_nlink != 1 ||
      info.st_size > 65536 || std::binary_search(excluded.begin(), excluded.end(), info.st_ino) ||
      ::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    return -1;
  }
  struct stat named {};
  if (::fstatat(spare_directory_fd, name.c_str(), &named, AT_SYMLINK_NOFOLLOW) != 0 || named.st_ino != info.st_ino ||
      named.st_dev != info.st_dev || named.st_nlink != 1) {
    return -1;
  }
  if ((info.st_mode & 07777) != 0644 && ::fchmod(fd, 0644) != 0) return -1;
  size = std::size_t(info.st_size);
  file.fd = -1;
  return fd;
}

}  // namespace

PreparedLeaseInode::PreparedLeaseInode(const std::string& directory, bool or_tmpfile, const std::vector<ino_t>& excluded) {
  const int spare_directory_fd = open_spare_directory(directory, ::geteuid(), /*create=*/false);
  if (spare_directory_fd >= 0) {
    std::vector<ino_t> sorted_copy;
    if (!std::is_sorted(excluded.begin(), excluded.end())) {
      sorted_copy = excluded;
      std::sort(sorted_copy.begin(), sorted_copy.end());
    }
    const std::vector<ino_t>& sorted = sorted_copy.empty() ? excluded : sorted_copy;
    std::vector<std::string> spares = list_spares(spare_directory_fd, sorted);
    // Launches started together list the same spares: each tries a few at random, so that they
    // rarely try to claim the same (one that is taken is dropped from this launch's list).
    std::uint32_t random = spares.empty() ? 0 : random_u32() | 1;
    for (int tries = 0; !spares.empty() && tries < 32; ++tries) {
      random ^= random << 13;  // xorshift32: a cheap sequence from one random draw
      random ^= random >> 17;
      random ^= random << 5;
      const std::size_t at = random % spares.size();
      fd_ = claim_spare(spare_directory_fd, spares[at], sorted, spare_size_);
      if (fd_ >= 0) {
        spare_ = spare_directory(directory, ::geteuid()) + "/" + spares[at];
        break;
      }
      spares[at] = std::move(spares.back());
      spares.pop_back();
    }
    ::close(spare_directory_fd);
    if (fd_ >= 0) return;
  }
  if (!or_tmpfile) return;
  fd_ = ::open(directory.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0644);
  // Mode and lock now too, out of the host lock: nobody else can reach a nameless inode.
  // O_TMPFILE's mode went through the umask; a lease others cannot read would not count for them.
  if (fd_ >= 0 && (::fchmod(fd_, 0644) != 0 || ::flock(fd_, LOCK_EX | LOCK_NB) != 0)) {
    ::close(fd_);
    fd_ = -1;  // the temp file + rename path will do it, and report what fails
  }
}

PreparedLeaseInode& PreparedLeaseInode::operator=(PreparedLeaseInode&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = std::exchange(other.fd_, -1);
    spare_ = std::move(other.spare_);
    spare_size_ = other.spare_size_;
  }
  return *this;
}

PreparedLeaseInode::~PreparedLeaseInode() {
  if (fd_ >= 0) ::close(fd_);
}

namespace {

bool write_text(int fd, const std::string& text) { return fd_io::write_all(fd, text.data(), text.size()); }

// Fills and names a prepared inode (`spare`: its path as a spare, "" for an O_TMPFILE file;
// `spare_size`: the spare's size). -1 (and the fd closed) when it cannot be named here; the caller
// then takes the ordinary path, which reports any real failure.
int publish_prepared(int fd, const std::string& spare, std::size_t spare_size, const std::string& final_path,
                     std::string text, bool lock_it, bool replace) {
  // Already 0644 and locked (PreparedLeaseInode). A spare keeps its old text until now: it is
  // overwritten, and a shorter text is padded with spaces to the old length (JSON allows them
  // after the object) instead of cutting the file: ftruncate was a tenth of a launch's time
  // under the host lock, and emptying a file frees its block, which costs a discard on some file
  // systems, only to allocate one again.
  // Padding only up to kMostPadding: a spare that once held a very long command is cut once, so
  // that spares do not keep the size of the longest lease they ever held.
  constexpr std::size_t kMostPadding = 1024;
  const bool pad = !spare.empty() && text.size() < spare_size && spare_size - text.size() <= kMostPadding;
  if (pad) text.insert(text.size() - 1, spare_size - text.size(), ' ');
  if (!write_text(fd, text) || (!spare.empty() && !pad && text.size() < spare_size && ::ftruncate(fd, off_t(text.size())) != 0)) {
    ::close(fd);
    return -1;
  }
  // Only a reassign (`replace`) replaces an existing name; lease ids are otherwise fresh. A spare
  // is linked under the lease's name and keeps its own (see PreparedLeaseInode). A link cannot
  // replace a name, so a reassign moves the spare over the lease's name instead (in one step: no
  // temporary name to leave behind); its release then moves it back. An O_TMPFILE file cannot be
  // linked over a name either, so a reassign without a spare takes the temp file path.
  int named;
  if (!spare.empty()) {
    named = replace ? ::rename(spare.c_str(), final_path.c_str()) : ::link(spare.c_str(), final_path.c_str());
  } else if (replace) {
    named = -1;
  } else {
    // Naming an O_TMPFILE inode through /proc needs no privilege (AT_EMPTY_PATH would).
    const std::string self = "/proc/self/fd/" + std::to_string(fd);
    named = ::linkat(AT_FDCWD, self.c_str(), AT_FDCWD, final_path.c_str(), AT_SYMLINK_FOLLOW);
  }
  if (named != 0) {
    ::close(fd);
    return -1;
  }
  // A lease that lives by its expiry is not locked: unlocked only once named, so that no other
  // launch could claim it as a spare in between.
  if (!lock_it) ::flock(fd, LOCK_UN);
  return fd;
}

}  // namespace

Result<int> write_lease_file(const std::string& directory, const LeaseRecord& record, bool lock_it,
                             PreparedLeaseInode* prepared, bool replace) {
  const std::string final_path = directory + "/" + lease_file_name(record);
  const std::string text = to_json_text(record);
  if (prepared != nullptr && !prepared->empty()) {
    const std::size_t spare_size = prepared->spare_size();
    const auto [prepared_fd, spare] = prepared->take();
    const int fd = publish_prepared(prepared_fd, spare, spare_size, final_path, text, lock_it, replace);
    if (fd >= 0) return fd;
  }
  const std::string temp_path = directory + "/.lease-" + record.id + ".tmp";
  auto fail = [&](const std::string& what) -> Result<int> {
    const std::string why = std::strerror(errno);
    ::unlink(temp_path.c_str());
    return make_error(Errc::state, "cannot " + what + " lease file in " + directory + ": " + why);
  };
  const int fd = ::open(temp_path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
  if (fd < 0) return fail("create");
  // Readable by everyone (status, leases, every other launch's count), writable by the holder alone.
  if (::fchmod(fd, 0644) != 0) {
    const int saved = errno;
    ::close(fd);
    errno = saved;
    return fail("set the mode of");
  }
  if (lock_it && ::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    ::close(fd);
    return fail("lock");
  }
  if (!write_text(fd, text)) {
    const int saved = errno;
    ::close(fd);
    errno = saved;
    return fail("write");
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

// The live HeldLeases of this process, for the forked child (see the class comment).
struct HeldLeaseRegistry {
  static HeldLeaseRegistry& get() {
    static HeldLeaseRegistry* registry = [] {
      auto* made = new HeldLeaseRegistry;  // never destroyed: a lease may outlive static destruction
      ::pthread_atfork([] { get().mutex.lock(); }, [] { get().mutex.unlock(); }, [] { get().forget_in_child(); });
      return made;
    }();
    return *registry;
  }
  void add(HeldLease* lease) {
    std::lock_guard<std::mutex> lock(mutex);
    leases.push_back(lease);
  }
  void remove(HeldLease* lease) {
    std::lock_guard<std::mutex> lock(mutex);
    std::erase(leases, lease);
  }
  // In the child, single-threaded, with the mutex taken by the forking thread before the fork:
  // closing a descriptor and emptying strings allocate nothing.
  void forget_in_child() {
    for (HeldLease* lease : leases) {
      if (lease->fd_ >= 0) ::close(lease->fd_);
      lease->fd_ = -1;
      lease->record_.path.clear();
    }
    leases.clear();
    mutex.unlock();
  }
  std::mutex mutex;
  std::vector<HeldLease*> leases;
};

HeldLease::HeldLease(LeaseRecord record, int fd) : record_(std::move(record)), fd_(fd) { HeldLeaseRegistry::get().add(this); }

HeldLease::~HeldLease() {
  release();
  HeldLeaseRegistry::get().remove(this);
}

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
  // The new file is a spare where this user has one; the old inode becomes one (it keeps its
  // spare name, or is given one first, so that the rename below does not delete it), so a
  // reassign creates no inode.
  // A name that points to one of its own former inodes again would pass, for a reader that still
  // holds that inode open from before, for the file it read then: never reuse those.
  struct stat current {};
  const bool known = ::fstat(fd_, &current) == 0;
  if (known) former_inodes_.push_back(current.st_ino);
  lease_internal::PreparedLeaseInode prepared(directory, /*or_tmpfile=*/false, former_inodes_);
  // The old inode given a spare name here, if it had none. Should the reassign fail after that,
  // the lease is live under both names until released, and then a spare.
  if (prepared.is_spare() && known && current.st_nlink == 1) lease_internal::keep_as_spare(record_.path, /*move=*/false);
  auto fd = lease_internal::write_lease_file(directory, next, /*lock_it=*/true, &prepared, /*replace=*/true);
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
  if (!record_.path.empty()) {
    // The name goes first, then the lock: never visible unlocked. The inode is kept as a spare for
    // this user's next lease (PreparedLeaseInode) rather than deleted: one that already has a
    // spare name (it was one) only loses the lease's; one made new is moved to the spare
    // directory.
    struct stat info {};
    const bool has_spare_name = fd_ >= 0 && ::fstat(fd_, &info) == 0 && info.st_nlink > 1;
    const bool moved = !has_spare_name && fd_ >= 0 && lease_internal::keep_as_spare(record_.path, /*move=*/true);
    if (!moved) ::unlink(record_.path.c_str());
  }
  record_.path.clear();
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

}  // namespace gpuslot
