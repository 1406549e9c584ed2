// pool_worker.cpp — life of a worker process, from fork to _exit.
//
// Why each step:
// - PR_SET_PDEATHSIG: a worker must not outlive the pool's process (it would hold GPU memory
//   nobody asked for); the kernel kills it when the dispatcher thread that forked it ends.
// - Descriptors into the state directory are closed: the worker inherits copies of the pool's
//   lease files and, if another thread was inside the ledger at the fork, of the host lock. The
//   kernel keeps a flock while any copy is open, so a copy kept here would keep a lease alive
//   after its holder released it, or stall every gpuslot on the host.
// - Other workers' sockets are closed, so a dead worker's end-of-file reaches the pool.
// - SIGINT is ignored: Ctrl-C in a terminal reaches the whole process group, and it is the
//   pool's process that decides what stops; workers stop when their socket closes.
// - _exit, never exit: the worker is a copy of the pool's process, whose atexit handlers and
//   static destructors (which release leases, flush the parent's buffers) are not its own.
#include "api/pool_worker.hpp"

#include <dirent.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>

#include "api/pool_protocol.hpp"

namespace gpuslot::pool_internal {

namespace {

using pool_protocol::Frame;
using pool_protocol::FrameKind;

void close_state_directory_descriptors(const std::string& directory, int keep) {
  if (directory.empty()) return;
  DIR* fds = ::opendir("/proc/self/fd");
  if (fds == nullptr) return;
  std::vector<int> to_close;
  while (const dirent* entry = ::readdir(fds)) {
    const int fd = std::atoi(entry->d_name);
    if (fd <= 2 || fd == keep || fd == ::dirfd(fds)) continue;
    char link[64];
    char target[PATH_MAX];
    std::snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    const ssize_t n = ::readlink(link, target, sizeof target - 1);
    if (n <= 0) continue;
    const std::string path(target, std::size_t(n));
    if (path == directory || path.rfind(directory + "/", 0) == 0) to_close.push_back(fd);
  }
  ::closedir(fds);
  for (int fd : to_close) ::close(fd);
}

TaskOutcome guarded(const std::function<TaskOutcome()>& call) {
  try {
    return call();
  } catch (const std::exception& e) {
    return TaskOutcome::failure(std::string("uncaught C++ exception: ") + e.what());
  } catch (...) {
    return TaskOutcome::failure("uncaught C++ exception");
  }
}

[[noreturn]] void finish(const WorkerProgram& program, int status) {
  if (program.before_exit) {
    try {
      program.before_exit();
    } catch (...) {
    }
  }
  ::_exit(status);
}

}  // namespace

void run_worker(const WorkerSetup& setup, const WorkerProgram& program) {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != setup.parent) ::_exit(1);  // the pool died before the line above
  ::signal(SIGINT, SIG_IGN);
  ::sigprocmask(SIG_SETMASK, &setup.signal_mask, nullptr);
  for (int fd : setup.close_fds) {
    if (fd >= 0 && fd != setup.fd) ::close(fd);
  }
  close_state_directory_descriptors(setup.state_directory, setup.fd);

  TaskOutcome started = program.init ? guarded([&] { return program.init(setup.device); }) : TaskOutcome::success({});
  if (!started.ok) {
    pool_protocol::write_frame(setup.fd, Frame{FrameKind::init_failed, 0, started.message, started.payload});
    finish(program, 1);
  }
  if (!pool_protocol::write_frame(setup.fd, Frame{FrameKind::ready, 0, {}, {}})) finish(program, 1);
  while (auto frame = pool_protocol::read_frame(setup.fd)) {
    if (frame->kind != FrameKind::task) continue;
    TaskOutcome outcome = guarded([&] { return program.work(frame->payload); });
    Frame reply{outcome.ok ? FrameKind::succeeded : FrameKind::failed, frame->task, std::move(outcome.message),
                std::move(outcome.payload)};
    if (!pool_protocol::write_frame(setup.fd, reply)) finish(program, 1);
  }
  finish(program, 0);  // end of input: the pool is closing
}

}  // namespace gpuslot::pool_internal
