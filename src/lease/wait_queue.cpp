// wait_queue.cpp — `run --wait`: wait FIFO-fair for room, woken by releases, not by a slow poll.
//
// Each waiter holds a ticket file (wait-<ns>-<pid>.ticket) flock'ed for as long as it waits, so
// a waiter that dies leaves the queue at once, like a lease. Tickets are named by the time they
// were taken under the host lock, so names sort in arrival order. A ticket lists the GPUs its
// waiter could use (visible to it, not excluded: one UUID a line). A waiter may reserve only on
// GPUs that no earlier waiter could use: no launch overtakes an earlier one where that one could
// go, so a big request is never starved by small ones, and a waiter limited to GPU 0 holds up
// nobody who waits for GPU 2. A ticket that lists nothing (unreadable) stands for every GPU.
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
#include <set>
#include <string_view>

#include "common/fd_io.hpp"
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

struct QueuedTicket {
  std::string path;
  std::vector<std::string> gpus;  // the UUIDs its waiter could use; empty: any GPU
};

// The GPUs a ticket lists (one UUID a line); empty when it lists none or cannot be read.
std::vector<std::string> gpus_of_ticket(int fd) {
  char text[16384];
  const ssize_t n = ::pread(fd, text, sizeof text, 0);
  std::vector<std::string> gpus;
  if (n <= 0 || std::size_t(n) == sizeof text) return gpus;  // nothing, or more than any host has
  std::string_view rest(text, std::size_t(n));
  while (!rest.empty()) {
    const auto end = rest.find('\n');
    const std::string_view line = rest.substr(0, end);
    if (!line.empty()) gpus.emplace_back(line);
    if (end == std::string_view::npos) break;
    rest.remove_prefix(end + 1);
  }
  return gpus;
}

// Live tickets in arrival order; dead ones are removed where this user may.
std::vector<QueuedTicket> live_tickets(const std::string& directory) {
  std::vector<QueuedTicket> tickets;
  DIR* dir = ::opendir(directory.c_str());
  if (dir == nullptr) return tickets;
  while (const dirent* entry = ::readdir(dir)) {
    const std::string name = entry->d_name;
    if (name.rfind("wait-", 0) != 0) continue;
    const std::string path = directory + "/" + name;
    const int fd = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) continue;
    const bool live = is_locked_by_someone(fd);
    if (!live) {
      ::unlink(path.c_str());
    } else if (!is_stopped(pid_of_ticket(name))) {
      // A stopped waiter (Ctrl-Z, SIGSTOP) keeps its place but must not hold up the queue.
      tickets.push_back({path, gpus_of_ticket(fd)});
    }
    ::close(fd);
  }
  ::closedir(dir);
  std::sort(tickets.begin(), tickets.end(), [](const QueuedTicket& a, const QueuedTicket& b) { return a.path < b.path; });
  return tickets;
}

// The GPUs this request could ever use in `snapshot`: visible to it, not excluded, readable —
// whatever their memory and load now. Empty if that cannot be told (then it is queued for all).
std::vector<std::string> usable_gpus(const ReserveRequest& request, const Snapshot& snapshot, const VisibilityOf& visibility_of) {
  Requirements any = request.requirements;
  any.memory_bytes = 0;
  any.gpu_count = 1;
  any.max_utilization.reset();
  std::vector<std::string> gpus;
  const auto decision = select_gpus(any, snapshot, visibility_of(snapshot), {});
  if (!decision) return gpus;
  for (const auto& verdict : decision->verdicts) {
    if (verdict.eligible && verdict.nvml_index < snapshot.gpus.size()) gpus.push_back(snapshot.gpus[verdict.nvml_index].uuid);
  }
  return gpus;
}

Result<void> take_ticket(const std::string& directory, Ticket& ticket, const std::vector<std::string>& gpus) {
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
  std::string listed;
  for (const auto& uuid : gpus) listed += uuid + "\n";
  // Written under the host lock, before anyone can read it. A ticket whose list did not make it
  // stands for every GPU, which only makes later waiters wait more.
  if (!listed.empty()) fd_io::write_all(fd, listed.data(), listed.size());
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
  bool tried_last_time = true;  // a waiter that tried last time will likely decide again: snapshot early
  std::vector<std::string> usable;  // the GPUs this waiter could use (its ticket lists them)
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
    if (tried_last_time) {
      auto snapshot = snapshot_source();
      if (!snapshot) return std::move(snapshot).error();
      early = std::move(*snapshot);
      view = view_before_lock(directory_, *early, &attempt_warnings);
    }
    {
      auto lock = HostLock::acquire(directory_);
      if (!lock) return lock.error();
      const std::vector<QueuedTicket> tickets = live_tickets(directory_);
      const auto ahead = static_cast<std::size_t>(
          ticket.fd < 0 ? tickets.size()
                        : std::find_if(tickets.begin(), tickets.end(), [&](const QueuedTicket& t) { return t.path == ticket.name; }) -
                              tickets.begin());
      // GPUs a waiter ahead could use: not ours to take. `all_taken`: one of them could use any.
      std::set<std::string> taken_ahead;
      bool all_taken = false;
      for (std::size_t k = 0; k < ahead && k < tickets.size(); ++k) {
        if (tickets[k].gpus.empty()) all_taken = true;
        taken_ahead.insert(tickets[k].gpus.begin(), tickets[k].gpus.end());
      }
      auto some_left_for = [&](const std::vector<std::string>& gpus) {
        return ahead == 0 || (!all_taken && std::any_of(gpus.begin(), gpus.end(), [&](const std::string& uuid) {
                                return taken_ahead.count(uuid) == 0;
                              }));
      };
      bool some_left = some_left_for(usable);
      if (!early && (!announced || some_left || (usable.empty() && !all_taken))) {
        auto snapshot = snapshot_source();  // may take (or describe) now: read the GPUs, under the lock
        if (!snapshot) return std::move(snapshot).error();
        early = std::move(*snapshot);
      }
      if (usable.empty() && early) {
        usable = usable_gpus(request, *early, visibility_of);
        some_left = some_left_for(usable);
      }
      tried_last_time = some_left;
      if (!announced && ahead > 0) {
        // Why this launch waits, for the message: the whole request, taking nothing. It also
        // refuses, here as for the first in line, what waiting cannot help.
        auto described = reserve_locked(*this, request, identity, some_left ? *early : std::move(*early), visibility_of,
                                        /*take=*/false, view, &attempt_warnings);
        pass_on_warnings();
        if (!described || described->decision.impossible) return described;
        pending = described->decision.summary;
      }
      if (some_left) {
        ReserveRequest narrowed = request;  // kept off the GPUs the waiters ahead could use
        for (const auto& uuid : taken_ahead) {
          if (early->find_uuid(uuid) != nullptr) narrowed.requirements.exclude.push_back(uuid);
        }
        auto attempt = reserve_locked(*this, narrowed, identity, std::move(*early), visibility_of, /*take=*/true, view,
                                      &attempt_warnings);
        pass_on_warnings();
        if (ahead == 0) {
          if (!attempt || attempt->lease || attempt->decision.impossible) return attempt;  // got it, or waiting cannot help
          pending = attempt->decision.summary;
        } else if (attempt && attempt->lease) {
          return attempt;
        }
        // Ahead of others: without their GPUs the request may not fit, or not even look possible
        // (too few GPUs left): it waits for them.
      }
      if (ahead > 0) {
        if (!pending.empty()) pending += "; ";
        pending += std::to_string(ahead) + (ahead == 1 ? " launch" : " launches") + " ahead";
      }
      if (ticket.fd < 0) {
        if (auto taken = take_ticket(directory_, ticket, usable); !taken) return taken.error();
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
