// api/lease_state.hpp — what a GpuLease holds. Internal to the api layer.
#pragma once

#include <unistd.h>

#include <memory>
#include <string>
#include <vector>

#include "gpuslot/gpuslot.hpp"

namespace gpuslot {

struct GpuLease::State {
  std::unique_ptr<HeldLease> held;
  pid_t owner = ::getpid();  // the process that took it; a forked copy never releases it
  std::vector<unsigned> nvml_indices;
  std::vector<std::string> uuids;
  std::vector<unsigned> cuda_ordinals;

  // Gives the lease back, but only in the process that took it. A child forked since holds a
  // copy of the lease file's descriptor: closing that copy leaves the parent's lock (and file)
  // alone, whereas removing the file would release the parent's room under its feet.
  void release() {
    if (!held) return;
    if (::getpid() == owner) held->release();
    else held->detach();
    held.reset();
  }
  ~State() { release(); }
};

}  // namespace gpuslot
