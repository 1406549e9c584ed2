// api/pool_worker.hpp — the worker side of the pool: what a freshly forked worker process does.
// Internal to the api layer.
#pragma once

#include <signal.h>
#include <sys/types.h>

#include <string>
#include <vector>

#include "gpuslot/pool.hpp"

namespace gpuslot::pool_internal {

struct WorkerSetup {
  int fd = -1;                       // the worker's end of its socket
  std::vector<int> close_fds;        // the pool's other descriptors (other workers' sockets, …)
  WorkerDevice device;
  pid_t parent = 0;                  // the pool's process
  sigset_t signal_mask{};            // the mask of the thread that created the pool
  std::string state_directory;       // descriptors into it (lease files, the host lock) are closed
};

// Runs init, then tasks until end of input; never returns (ends with _exit).
[[noreturn]] void run_worker(const WorkerSetup& setup, const WorkerProgram& program);

}  // namespace gpuslot::pool_internal
