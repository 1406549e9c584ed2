// library.cpp — the one source of libgpuslot.so itself; everything else comes whole from the
// layer archives (see CMakeLists.txt). It checks, at build time, that the public headers hold
// together as a consumer sees them.
#include "gpuslot/gpuslot.hpp"
#include "gpuslot/pool.hpp"
