// shepherd.cpp — the shepherds that run a batch's attempts, and the attempts' files.
#include "jobs/shepherd.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <set>
#include <sstream>

#include "common/fd_io.hpp"

namespace gpuslot::jobs_internal {

namespace {

// Reset to their defaults for a job, whatever the scheduler or shepherd did with them (the
// scheduler ignores SIGIO, see AttemptFilePool::give_back).
constexpr int kJobSignals[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGPIPE, SIGCHLD, SIGUSR1, SIGUSR2, SIGIO};

void write_all(int fd, const std::string& text) { (void)fd_io::write_all(fd, text.data(), text.size()); }

// Appends the status line ("exit N", "signal N", "error N MESSAGE") to the run file in one write.
void write_status(int run_fd, const std::string& line) { write_all(run_fd, line + "\n"); }

// --- the order on the wire: one 8-byte length sent with the four descriptors, then the text
// (NUL-terminated fields: cwd, lease path, argc, argv…, envc, environment…).

constexpr std::size_t kOrderFds = 4;  // run, out, err, lease
constexpr std::uint64_t kLongestOrder = std::uint64_t(1) << 30;

void put(std::string& text, const std::string& field) {
  text += field;
  text += '\0';
}

// The first part of an order on the wire: its length, with room for the descriptors beside it.
struct LengthMessage {
  std::uint64_t length = 0;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kOrderFds)] = {};
  iovec part{&length, sizeof length};
  msghdr message{};
  LengthMessage() {
    message.msg_iov = &part;
    message.msg_iovlen = 1;
    message.msg_control = control;
    message.msg_controllen = sizeof control;
  }
  LengthMessage(const LengthMessage&) = delete;
  LengthMessage& operator=(const LengthMessage&) = delete;
};

// nullopt when the scheduler closed the socket (or died), or the order is malformed.
std::optional<ShepherdOrder> receive_order(int socket) {
  LengthMessage first;
  ssize_t n = 0;
  do {
    n = ::recvmsg(socket, &first.message, MSG_CMSG_CLOEXEC | MSG_WAITALL);
  } while (n < 0 && errno == EINTR);
  const std::uint64_t length = first.length;
  std::vector<int> fds;
  for (cmsghdr* header = CMSG_FIRSTHDR(&first.message); header != nullptr; header = CMSG_NXTHDR(&first.message, header)) {
    if (header->cmsg_level != SOL_SOCKET || header->cmsg_type != SCM_RIGHTS) continue;
    const std::size_t count = (header->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (std::size_t i = 0; i < count; ++i) {
      int fd = -1;
      std::memcpy(&fd, CMSG_DATA(header) + i * sizeof(int), sizeof fd);
      fds.push_back(fd);
    }
  }
  auto drop = [&fds]() -> std::optional<ShepherdOrder> {
    for (int fd : fds) ::close(fd);
    return std::nullopt;
  };
  if (n != ssize_t(sizeof length) || fds.size() != kOrderFds || length > kLongestOrder) return drop();
  std::string text(length, '\0');
  if (!fd_io::read_exactly(socket, text.data(), text.size())) return drop();
  std::vector<std::string> fields;
  for (std::size_t at = 0; at < text.size();) {
    const std::size_t end = text.find('\0', at);
    if (end == std::string::npos) return drop();
    fields.push_back(text.substr(at, end - at));
    at = end + 1;
  }
  ShepherdOrder order;
  std::size_t next = 0;
  auto take_list = [&fields, &next](std::vector<std::string>& into) {
    if (next >= fields.size()) return false;
    const std::size_t count = std::strtoul(fields[next++].c_str(), nullptr, 10);
    if (count > fields.size() - next) return false;
    into.assign(fields.begin() + std::ptrdiff_t(next), fields.begin() + std::ptrdiff_t(next + count));
    next += count;
    return true;
  };
  if (fields.size() < 2) return drop();
  order.cwd = fields[0];
  order.lease_path = fields[1];
  next = 2;
  if (!take_list(order.argv) || order.argv.empty() || !take_list(order.environment) || next != fields.size()) return drop();
  order.files.run = fds[0];
  order.files.out = fds[1];
  order.files.err = fds[2];
  order.lease_fd = fds[3];
  return order;
}

// One attempt, from the order to the status line. The lease is released and the files closed
// before it returns.
void run_attempt(ShepherdOrder& order) {
  LeaseRecord record;
  record.path = order.lease_path;
  HeldLease lease(std::move(record), order.lease_fd);
  const int lock_fd = order.files.run;
  write_all(lock_fd, "pid " + std::to_string(::getpid()) + "\n");

  std::vector<char*> envp;
  for (auto& entry : order.environment) envp.push_back(entry.data());
  envp.push_back(nullptr);
  std::vector<char*> argv;
  for (auto& word : order.argv) argv.push_back(word.data());
  argv.push_back(nullptr);
  const bool search_path = order.argv[0].find('/') == std::string::npos;

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  // Received in the order run, out, err, each on the lowest free number: with 0, 1 and 2 open
  // (the shepherd keeps the scheduler's), all are >= 3, so neither dup2 clobbers the other.
  posix_spawn_file_actions_adddup2(&actions, order.files.out, 1);
  posix_spawn_file_actions_adddup2(&actions, order.files.err, 2);
  if (!order.cwd.empty()) posix_spawn_file_actions_addchdir_np(&actions, order.cwd.c_str());
  posix_spawnattr_t attributes;
  posix_spawnattr_init(&attributes);
  sigset_t defaults;
  sigemptyset(&defaults);
  for (int signal_number : kJobSignals) sigaddset(&defaults, signal_number);
  sigset_t empty;
  sigemptyset(&empty);
  posix_spawnattr_setsigdefault(&attributes, &defaults);
  posix_spawnattr_setsigmask(&attributes, &empty);
  posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK);

  pid_t child = 0;
  const int rc = search_path ? ::posix_spawnp(&child, argv[0], &actions, &attributes, argv.data(), envp.data())
                             : ::posix_spawn(&child, argv[0], &actions, &attributes, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attributes);
  if (rc != 0) {
    const int code = (rc == ENOENT) ? 127 : 126;
    std::string message = "cannot start " + order.argv[0] + ": " + std::strerror(rc);
    if (!order.cwd.empty() && rc == ENOENT) message += " (or cwd " + order.cwd + " is gone)";
    write_all(order.files.err, "gpuslot: " + message + "\n");
    write_status(lock_fd, "error " + std::to_string(code) + " " + message);
  } else {
    int status = 0;
    while (::waitpid(child, &status, 0) < 0 && errno == EINTR) {
    }
    write_status(lock_fd, WIFSIGNALED(status) ? "signal " + std::to_string(WTERMSIG(status))
                                                   : "exit " + std::to_string(WEXITSTATUS(status)));
  }
  lease.release();
  order.files.close_all();  // the run file's lock goes last: the status is in it by then
}

// Closes every descriptor above 2 but `keep_a` and `keep_b`: close_range(2), or where the kernel
// lacks it (before 5.9, or a seccomp filter refuses it) one by one from /proc/self/fd.
void close_all_but(int keep_a, int keep_b) {
  const unsigned low = unsigned(std::min(keep_a, keep_b)), high = unsigned(std::max(keep_a, keep_b));
  bool closed = true;
  if (low > 3) closed = ::close_range(3, low - 1, 0) == 0;
  if (closed && high > std::max(low + 1, 3u)) closed = ::close_range(std::max(low + 1, 3u), high - 1, 0) == 0;
  if (closed) closed = ::close_range(std::max(high + 1, 3u), ~0U, 0) == 0;
  if (closed) return;
  std::vector<int> open;
  if (DIR* listing = ::opendir("/proc/self/fd")) {
    const int own = ::dirfd(listing);
    while (const dirent* entry = ::readdir(listing)) {
      const int fd = std::atoi(entry->d_name);
      if (fd > 2 && fd != own && fd != keep_a && fd != keep_b) open.push_back(fd);
    }
    ::closedir(listing);
  }
  for (int fd : open) ::close(fd);
}

// `files_limit`: RLIMIT_NOFILE to put back for jobs, null when the scheduler did not change it.
[[noreturn]] void shepherd_main(int socket, int ended_write, const rlimit* files_limit) {
  // Nothing of the scheduler's may stay open here (its journal, lock, signalfd, another
  // shepherd's socket, an attempt's files): each would outlive the scheduler with this process.
  close_all_but(socket, ended_write);
  // 0, 1 and 2 become /dev/null (but for this shepherd's own socket or pipe, if they are there):
  // a scheduler started without them has its own objects there — its end of this very socket,
  // the read end of the pipe — and a shepherd keeping those would never see its socket close.
  // They stay taken, so an attempt's files arrive as 3 and up and the job's dup2 onto 1 and 2
  // cannot clobber one another.
  const int null_fd = ::open("/dev/null", O_RDWR);
  for (int fd = 0; fd < 3; ++fd) {
    if (fd == socket || fd == ended_write || fd == null_fd) continue;
    if (null_fd < 0 || ::dup2(null_fd, fd) != fd) {
      ::close(fd);
      ::open("/dev/null", O_RDWR);
    }
  }
  if (null_fd > 2) ::close(null_fd);
  if (files_limit != nullptr) ::setrlimit(RLIMIT_NOFILE, files_limit);  // jobs get the scheduler's own
  // The job gets the signals the scheduler forwards; the shepherd must outlive it to record how
  // it ended, so it ignores them itself (not SIGKILL: a second Ctrl-C kills both).
  for (int signal_number : {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGPIPE}) ::signal(signal_number, SIG_IGN);
  ::signal(SIGCHLD, SIG_DFL);
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);  // the scheduler blocks signals for its signalfd
  ::setpgid(0, 0);
  const std::int32_t self = ::getpid();
  try {
    while (auto order = receive_order(socket)) {
      run_attempt(*order);
      order.reset();
      // A scheduler that is gone cannot hear it (EPIPE): the next receive sees the socket closed.
      while (::write(ended_write, &self, sizeof self) < 0 && errno == EINTR) {
      }
    }
  } catch (...) {
    // Never unwind into the scheduler's frames this process was forked from. The attempt, if
    // any, has no status: it is requeued.
    ::_exit(70);
  }
  ::_exit(0);
}
}  // namespace

AttemptFiles attempt_files(const std::string& logs_dir, const std::string& name, unsigned attempt) {
  const std::string base = logs_dir + "/" + name + "." + std::to_string(attempt);
  return {base + ".run", base + ".out", base + ".err"};
}

std::optional<std::vector<std::string>> direct_argv(const std::string& line) {
  static const std::set<std::string> kShellWords = {
      "!", ".", ":", "[", "[[", "alias", "bg", "break", "case", "cd", "command", "continue", "do", "done", "echo",
      "elif", "else", "esac", "eval", "exec", "exit", "export", "fc", "fg", "fi", "for", "function", "getopts",
      "hash", "if", "in", "jobs", "kill", "let", "local", "printf", "pwd", "read", "readonly", "return", "select",
      "set", "shift", "source", "test", "then", "time", "times", "trap", "type", "typeset", "ulimit", "umask",
      "unalias", "unset", "until", "wait", "while"};
  std::vector<std::string> words;
  std::string word;
  for (char c : line) {
    const bool plain = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
                       c == '_' || c == '.' || c == '/' || c == ',' || c == ':' || c == '+' || c == '%' || c == '@' ||
                       c == '=' || c == '^';
    if (c == ' ' || c == '\t') {
      if (!word.empty()) words.push_back(std::move(word));
      word.clear();
    } else if (plain) {
      word += c;
    } else {
      return std::nullopt;  // quoting, expansion, redirection, operators, globs, comments: the shell's job
    }
  }
  if (!word.empty()) words.push_back(std::move(word));
  if (words.empty() || kShellWords.count(words[0]) != 0 || words[0].find('=') != std::string::npos) return std::nullopt;
  return words;
}

ShepherdPool::~ShepherdPool() {
  for (auto& member : members_) ::close(member.socket);
  for (auto& member : members_) {
    if (!member.busy) ::waitpid(member.pid, nullptr, 0);  // it sees the socket closed and exits
  }
  for (int fd : {ended_read_, ended_write_}) {
    if (fd >= 0) ::close(fd);
  }
  if (raised_files_limit_) ::setrlimit(RLIMIT_NOFILE, &files_limit_);
}

ShepherdPool::Member* ShepherdPool::find(pid_t pid) {
  for (auto& member : members_) {
    if (member.pid == pid) return &member;
  }
  return nullptr;
}

Result<pid_t> ShepherdPool::idle() {
  for (const auto& member : members_) {
    if (!member.busy) return member.pid;
  }
  if (ended_read_ < 0) {
    // One socket per shepherd stays open here: allow as many as the hard limit does (a thousand
    // jobs at once would pass the usual soft limit of 1024). Shepherds put it back for jobs.
    if (!raised_files_limit_ && ::getrlimit(RLIMIT_NOFILE, &files_limit_) == 0 &&
        files_limit_.rlim_cur < files_limit_.rlim_max) {
      rlimit raised = files_limit_;
      raised.rlim_cur = raised.rlim_max;
      raised_files_limit_ = ::setrlimit(RLIMIT_NOFILE, &raised) == 0;
    }
    int ends[2];
    if (::pipe2(ends, O_CLOEXEC) != 0) return make_error(Errc::state, std::string("cannot make a pipe: ") + std::strerror(errno));
    ended_read_ = ends[0];
    ended_write_ = ends[1];
    ::fcntl(ended_read_, F_SETFL, O_NONBLOCK);
  }
  // Out of descriptors or processes is "not now" while a shepherd is busy: it will be free again.
  auto cannot = [this](const char* what, int error) {
    const bool busy = std::any_of(members_.begin(), members_.end(), [](const Member& member) { return member.busy; });
    const bool scarce = error == EMFILE || error == ENFILE || error == EAGAIN || error == ENOMEM;
    return make_error(scarce && busy ? Errc::nothing_fits : Errc::state, std::string(what) + std::strerror(error));
  };
  int ends[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, ends) != 0) return cannot("cannot make a socket pair: ", errno);
  const pid_t pid = ::fork();
  if (pid < 0) {
    const int error = errno;
    ::close(ends[0]);
    ::close(ends[1]);
    return cannot("cannot fork a job's shepherd: ", error);
  }
  if (pid == 0) {
    // Only async-signal-safe work would be strictly required after fork in a threaded process;
    // the scheduler is single-threaded, so the shepherd may allocate.
    shepherd_main(ends[1], ended_write_, raised_files_limit_ ? &files_limit_ : nullptr);
  }
  ::close(ends[1]);
  ::setpgid(pid, pid);  // also set here, so a signal sent right after fork reaches its group
  members_.push_back({pid, ends[0], false});
  return pid;
}

Result<void> ShepherdPool::hand(pid_t shepherd, const ShepherdOrder& order) {
  Member* member = find(shepherd);
  if (member == nullptr || member->busy) return make_error(Errc::internal, "no idle shepherd " + std::to_string(shepherd));
  auto has_nul = [](const std::string& field) { return field.find('\0') != std::string::npos; };
  if (has_nul(order.cwd) || has_nul(order.lease_path) || std::any_of(order.argv.begin(), order.argv.end(), has_nul) ||
      std::any_of(order.environment.begin(), order.environment.end(), has_nul)) {
    return make_error(Errc::bad_input, "a job's command, environment or folder holds a NUL character");
  }
  std::string text;
  put(text, order.cwd);
  // (An order longer than receive_order takes is refused below, as bad_input.)
  put(text, order.lease_path);
  put(text, std::to_string(order.argv.size()));
  for (const auto& word : order.argv) put(text, word);
  put(text, std::to_string(order.environment.size()));
  for (const auto& entry : order.environment) put(text, entry);
  if (text.size() > kLongestOrder) {
    return make_error(Errc::bad_input, "a job's command and environment are " + std::to_string(text.size() >> 20) +
                                           " MiB; at most " + std::to_string(kLongestOrder >> 20) + " MiB");
  }
  LengthMessage first;
  first.length = text.size();
  const int fds[kOrderFds] = {order.files.run, order.files.out, order.files.err, order.lease_fd};
  cmsghdr* header = CMSG_FIRSTHDR(&first.message);
  header->cmsg_level = SOL_SOCKET;
  header->cmsg_type = SCM_RIGHTS;
  header->cmsg_len = CMSG_LEN(sizeof fds);
  std::memcpy(CMSG_DATA(header), fds, sizeof fds);
  ssize_t n = 0;
  do {
    n = ::sendmsg(member->socket, &first.message, MSG_NOSIGNAL);
  } while (n < 0 && errno == EINTR);
  if (n != ssize_t(sizeof first.length) || !fd_io::send_all(member->socket, text.data(), text.size())) {
    // EPIPE, ECONNRESET: it died before taking the order (nothing_fits: try another).
    const int error = errno;
    return make_error(error == EPIPE || error == ECONNRESET ? Errc::nothing_fits : Errc::state,
                      "cannot hand a job to its shepherd " + std::to_string(shepherd) + ": " + std::strerror(error));
  }
  member->busy = true;
  return {};
}

std::vector<pid_t> ShepherdPool::ended() {
  std::vector<pid_t> pids;
  if (ended_read_ < 0) return pids;
  std::int32_t buffer[256];
  while (true) {
    const ssize_t n = ::read(ended_read_, buffer, sizeof buffer);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    for (std::size_t i = 0; i < std::size_t(n) / sizeof buffer[0]; ++i) {
      if (Member* member = find(pid_t(buffer[i])); member != nullptr && member->busy) {
        member->busy = false;
        pids.push_back(member->pid);
      }
    }
  }
  return pids;
}

bool ShepherdPool::forget(pid_t shepherd) {
  for (auto it = members_.begin(); it != members_.end(); ++it) {
    if (it->pid != shepherd) continue;
    ::close(it->socket);
    members_.erase(it);
    return true;
  }
  return false;
}

std::vector<std::string> job_words(const JobSpec& job) {
  if (!job.argv.empty()) return job.argv;
  return direct_argv(job.shell).value_or(std::vector<std::string>{"/bin/sh", "-c", job.shell});
}


void OpenedAttemptFiles::close_all() {
  for (int* fd : {&run, &out, &err}) {
    if (*fd >= 0) ::close(*fd);
    *fd = -1;
  }
}

namespace {

constexpr std::size_t kMostAttemptSpares = 1024;
constexpr const char* kSparePrefix = ".spare-";

}  // namespace

AttemptFilePool::AttemptFilePool(std::string logs_dir) : logs_dir_(std::move(logs_dir)) {
  DIR* directory = ::opendir(logs_dir_.c_str());
  if (directory == nullptr) return;
  while (const dirent* entry = ::readdir(directory)) {
    const std::string name = entry->d_name;
    if (name.rfind(kSparePrefix, 0) != 0 || spares_.size() >= kMostAttemptSpares) continue;
    char* end = nullptr;
    const unsigned long number = std::strtoul(name.c_str() + std::strlen(kSparePrefix), &end, 10);
    if (end == nullptr || *end != '\0') continue;
    spares_.push_back(name);
    next_ = std::max(next_, number + 1);
  }
  ::closedir(directory);
}

// A spare renamed to `target` and emptied, or `target` created when no spare is usable. A spare
// that was a run file is overwritten with NULs rather than truncated (readers stop at the first
// NUL): freeing its block would cost a discard on every reuse.
int AttemptFilePool::take(const std::string& target, int flags) {
  int fd = -1;
  while (fd < 0 && !spares_.empty()) {
    const std::string spare = logs_dir_ + "/" + spares_.back();
    spares_.pop_back();
    fd = ::open(spare.c_str(), flags | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) continue;  // gone, or a symlink: the next one
    struct stat info {};
    bool usable = ::fstat(fd, &info) == 0 && S_ISREG(info.st_mode) && info.st_nlink == 1 && info.st_uid == ::geteuid();
    if (usable && info.st_size > 0) {
      static const char kZeros[4096] = {};
      usable = (flags & O_APPEND) == 0 && info.st_size <= off_t(sizeof kZeros)
                   ? ::pwrite(fd, kZeros, std::size_t(info.st_size), 0) == ssize_t(info.st_size)
                   : ::ftruncate(fd, 0) == 0;
    }
    if (!usable || ::rename(spare.c_str(), target.c_str()) != 0) {
      ::close(fd);
      fd = -1;
    }
  }
  if (fd < 0) fd = ::open(target.c_str(), flags | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644);
  return fd;
}

Result<OpenedAttemptFiles> AttemptFilePool::open(const AttemptFiles& files) {
  OpenedAttemptFiles opened;
  opened.run = take(files.run, O_RDWR);
  if (opened.run >= 0 && ::flock(opened.run, LOCK_EX | LOCK_NB) != 0) {
    // Somebody holds the inode a spare gave us: a new one under the name instead.
    ::close(opened.run);
    ::unlink(files.run.c_str());
    opened.run = ::open(files.run.c_str(), O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (opened.run >= 0 && ::flock(opened.run, LOCK_EX | LOCK_NB) != 0) {
      ::close(opened.run);
      opened.run = -1;
    }
  }
  const std::string* failed = &files.run;
  if (opened.run >= 0) {
    failed = &files.out;
    opened.out = take(files.out, O_WRONLY | O_APPEND);
  }
  if (opened.out >= 0) {
    failed = &files.err;
    opened.err = take(files.err, O_WRONLY | O_APPEND);
  }
  if (opened.err < 0) {
    const int error = errno;
    opened.close_all();
    return make_error(Errc::state, "cannot create " + quote_for_message(*failed) + ": " + std::strerror(error));
  }
  return opened;
}

// Renamed to a spare only when nothing else holds it open: a write lease is granted only then
// (fcntl(2)), so a job's leftover background process that still writes to its log cannot write
// into a later job's. While the lease is held an open() of the file waits for it (and the kernel
// sends this process SIGIO, which the scheduler ignores); such an open started meanwhile shows
// as a lease being broken, and then the file goes back under its name and is not a spare.
// `only_if_empty`: logs are kept once they hold anything.
void AttemptFilePool::give_back(const std::string& path, bool only_if_empty) {
  if (spares_.size() >= kMostAttemptSpares) return;
  const int fd = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) return;
  auto candidate = [&]() {
    struct stat info {};
    return ::fstat(fd, &info) == 0 && S_ISREG(info.st_mode) && info.st_nlink == 1 && info.st_uid == ::geteuid() &&
           (!only_if_empty || info.st_size == 0);
  };
  if (candidate() && ::fcntl(fd, F_SETLEASE, F_WRLCK) == 0) {
    std::string name = kSparePrefix + std::to_string(next_++);
    const std::string spare = logs_dir_ + "/" + name;
    if (candidate() && ::rename(path.c_str(), spare.c_str()) == 0) {
      if (::fcntl(fd, F_GETLEASE) == F_WRLCK) {
        spares_.push_back(std::move(name));
      } else {
        ::rename(spare.c_str(), path.c_str());  // someone is opening it: it stays what it was
      }
    }
    ::fcntl(fd, F_SETLEASE, F_UNLCK);
  }
  ::close(fd);
}

void AttemptFilePool::recycle(const AttemptFiles& files) {
  give_back(files.out, /*only_if_empty=*/true);
  give_back(files.err, /*only_if_empty=*/true);
  give_back(files.run, /*only_if_empty=*/false);
}

namespace {

// A run file's text: up to the first NUL (AttemptFilePool::take).
std::string read_run_file(const std::string& run_path) {
  std::string text = read_tail(run_path, 8192);
  if (const std::size_t end = text.find('\0'); end != std::string::npos) text.resize(end);
  return text;
}

}  // namespace

std::optional<AttemptOutcome> read_outcome(const std::string& run_path) {
  const std::string text = read_run_file(run_path);
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    std::istringstream fields(line);
    std::string kind;
    int value = 0;
    if (!(fields >> kind >> value) || (kind != "exit" && kind != "signal" && kind != "error")) continue;
    AttemptOutcome outcome;
    if (kind == "signal") {
      outcome.signal = value;
    } else {
      outcome.exit_code = value;
      if (kind == "error") {
        std::getline(fields >> std::ws, outcome.error);
        if (outcome.error.empty()) outcome.error = "could not start";
      }
    }
    return outcome;
  }
  return std::nullopt;
}

bool attempt_alive(const std::string& lock_path) {
  const int fd = ::open(lock_path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) return false;
  const bool locked = ::flock(fd, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK;
  ::close(fd);
  return locked;
}

pid_t shepherd_pid(const std::string& run_path) {
  const std::string text = read_run_file(run_path);
  return text.rfind("pid ", 0) == 0 ? pid_t(std::atol(text.c_str() + 4)) : 0;
}

std::string read_tail(const std::string& path, std::size_t max_bytes) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) return "";
  struct stat info {};
  std::string text;
  if (::fstat(fd, &info) == 0 && S_ISREG(info.st_mode)) {
    const off_t size = info.st_size;
    const off_t start = size > off_t(max_bytes) ? size - off_t(max_bytes) : 0;
    text.resize(std::size_t(size - start));
    const ssize_t n = ::pread(fd, text.data(), text.size(), start);
    text.resize(n > 0 ? std::size_t(n) : 0);
  }
  ::close(fd);
  return text;
}

}  // namespace gpuslot::jobs_internal
