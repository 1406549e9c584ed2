// wait_queue.cpp — `run --wait`: wait FIFO-fair for room, woken by releases, not by a slow poll.
//
// Each waiter holds a ticket file (wait-<ns>-<pid>.ticket) flock'ed for as long as it waits, so
// a waiter that dies leaves the queue at once, like a lease. Tickets are named by the time they
// were taken under the host lock, so names sort in arrival order; only the first live ticket may
// reserve (no launch overtakes an earlier one, so a big request is never starved by small ones).
// Waiters sleep on inotify events of the state directory — a lease released or a ticket gone is
// a file removed — and at the latest every kPollInterval, since memory freed by processes
// outside gpuslot produces no file event.
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/file.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <ctime>

#include "lease/internal.hpp"

namespace gpuslot {

using namespace lease_internal;

namespace {

constexpr auto kPollInterval = std::chrono::milliseconds(250);
constexpr auto kCancelPollInterval = std::chrono::milliseconds(100);  // how often `cancelled` is asked

struct Ticket {
  std::string name;
  int fd = -1;
  ~Ticket() {
    if (fd >= 0) {
      ::unlink(name.c_str());
      ::close(fd);
    }
  }
};

// wait-<ns>-<pid>.ticket -> pid
pid_t pid_of_ticket(const std::string& name) {
  const auto dash = name.rfind('-');
  return dash == std::string::npos ? 0 : pid_t(std::strtol(name.c_str() + dash + 1, nullptr, 10));
}

// True if the process is stopped ('T') or traced-stopped ('t'), from /proc/<pid>/stat.
bool is_stopped(pid_t pid) {
  if (pid <= 0) return false;
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/stat", int(pid));
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  char buffer[512];
  const ssize_t n = ::read(fd, buffer, sizeof buffer - 1);
  ::close(fd);
  if (n <= 0) return false;
  buffer[n] = '\0';
  const char* close = std::strrchr(buffer, ')');
  return close != nullptr && close[1] == ' ' && (close[2] == 'T' || close[2] == 't');
}

// Live tickets in arrival order (full paths); dead ones are removed where this user may.
std::vector<std::string> live_tickets(const std::string& directory) {
  std::vector<std::string> tickets;
  DIR* dir = ::opendir(directory.c_str());
  if (dir == nullptr) return tickets;
  while (const dirent* entry = ::readdir(dir)) {
    const std::string name = entry->d_name;
    if (name.rfind("wait-", 0) != 0) continue;
    const std::string path = directory + "/" + name;
    const int fd = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) continue;
    const bool live = is_locked_by_someone(fd);
    ::close(fd);
    if (!live) {
      ::unlink(path.c_str());
    } else if (!is_stopped(pid_of_ticket(name))) {
      // A stopped waiter (Ctrl-Z, SIGSTOP) keeps its place but must not hold up the queue.
      tickets.push_back(path);
    }
  }
  ::closedir(dir);
  std::sort(tickets.begin(), tickets.end());
  return tickets;
}

Result<void> take_ticket(const std::string& directory, Ticket& ticket) {
  timespec now{};
  ::clock_gettime(CLOCK_MONOTONIC, &now);  // one clock for the whole host, immune to clock steps
  char name[96];
  std::snprintf(name, sizeof name, "/wait-%020lld-%010d.ticket", (long long)now.tv_sec * 1000000000LL + now.tv_nsec, int(::getpid()));
  ticket.name = directory + name;
  const int fd = ::open(ticket.name.c_str(), O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
  if (fd < 0 || ::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const std::string why = std::strerror(errno);
    if (fd >= 0) ::close(fd);
    ::unlink(ticket.name.c_str());
    return make_error(Errc::state, "cannot queue in " + directory + ": " + why);
  }
  ::fchmod(fd, 0644);
  ticket.fd = fd;
  return {};
}

}  // namespace

Result<Reservation> Ledger::reserve_waiting(const ReserveRequest& request, const SnapshotSource& snapshot_source,
                                            const VisibilityOf& visibility_of,
                                            std::optional<std::chrono::milliseconds> timeout,
                                            const std::function<void(const std::string&)>& on_pending,
                                            std::vector<std::string>* warnings, const std::function<bool()>& cancelled) {
  // A plain time_point plus a flag: std::optional<time_point> trips GCC 12's maybe-uninitialized.
  const bool has_deadline = timeout.has_value();
  const auto deadline = std::chrono::steady_clock::now() + timeout.value_or(std::chrono::milliseconds(0));
  // Watch before the first attempt, so a release between the attempt and the sleep is not missed.
  const int watch = ::inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
  if (watch >= 0) ::inotify_add_watch(watch, directory_.c_str(), IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO);
  struct CloseWatch {
    int fd;
    ~CloseWatch() { if (fd >= 0) ::close(fd); }
  } close_watch{watch};

  Ticket ticket;
  bool announced = false;
  bool was_first = true;  // a waiter that was first last time will likely decide again: snapshot early
  const LeaseRecord identity = holder_identity(request);
  // Each attempt reads the leases afresh (a lease whose holder died since the last attempt must
  // stop counting), but a corrupt or unsafe file is reported once per command, not per attempt.
  std::vector<std::string> attempt_warnings;
  auto pass_on_warnings = [&] {
    if (warnings != nullptr) {
      for (auto& warning : attempt_warnings) {
        if (std::find(warnings->begin(), warnings->end(), warning) == warnings->end()) warnings->push_back(std::move(warning));
      }
    }
    attempt_warnings.clear();
  };
  for (;;) {
    std::string pending;
    std::optional<Snapshot> early;
    // Leases read before the lock when the snapshot is (see Ledger::reserve); otherwise under it.
    LedgerView view{LeaseScan(directory_), {}, {}};
    if (was_first) {
      auto snapshot = snapshot_source();
      if (!snapshot) return std::move(snapshot).error();
      early = std::move(*snapshot);
      view = view_before_lock(directory_, *early, &attempt_warnings);
    }
    {
      auto lock = HostLock::acquire(directory_);
      if (!lock) return lock.error();
      const std::vector<std::string> tickets = live_tickets(directory_);
      const auto ahead = static_cast<std::size_t>(
          ticket.fd < 0 ? tickets.size() : std::find(tickets.begin(), tickets.end(), ticket.name) - tickets.begin());
      was_first = ahead == 0;
      if (ahead == 0 || !announced) {
        if (!early) {  // became first while queued: read the GPUs now, under the lock
          auto snapshot = snapshot_source();
          if (!snapshot) return std::move(snapshot).error();
          early = std::move(*snapshot);
        }
        auto attempt = reserve_locked(*this, request, identity, std::move(*early), visibility_of, /*take=*/ahead == 0,
                                      view, &attempt_warnings);
        pass_on_warnings();
        if (!attempt) return attempt;
        if (attempt->lease || attempt->decision.impossible) return attempt;  // got it, or waiting cannot help
        pending = attempt->decision.summary;
      }
      if (ahead > 0) {
        if (!pending.empty()) pending += "; ";
        pending += std::to_string(ahead) + (ahead == 1 ? " launch" : " launches") + " ahead";
      }
      if (ticket.fd < 0) {
        if (auto taken = take_ticket(directory_, ticket); !taken) return taken.error();
      }
    }
    pass_on_warnings();
    if (!announced) {
      on_pending(pending);
      announced = true;
    }
    if (cancelled && cancelled()) return make_error(Errc::timeout, "wait cancelled");
    auto wait_for = cancelled ? kCancelPollInterval : kPollInterval;
    if (has_deadline) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) {
        return make_error(Errc::timeout, "timed out waiting for room: " + (pending.empty() ? std::string("still queued") : pending));
      }
      wait_for = std::min(wait_for, left);
    }
    if (watch >= 0) {
      pollfd descriptor{watch, POLLIN, 0};
      ::poll(&descriptor, 1, int(wait_for.count()));
      char buffer[4096];
      while (::read(watch, buffer, sizeof buffer) > 0) {
      }
    } else {
      ::poll(nullptr, 0, int(wait_for.count()));
    }
  }
}

}  // namespace gpuslot
