// nvml_session.cpp — the process-wide state of the fake library (see nvml_session.h).
#include "nvml_session.h"

#include <cstdint>
#include <cstdlib>

// NVML declares the handle type as a pointer to this incomplete struct; the fake completes it.
struct nvmlDevice_st {
  unsigned int index;
};

namespace fake_nvml {
namespace {

struct Session {
  std::mutex mutex;
  int init_count = 0;  // NVML is reference counted: shutdown only at zero
  HostCache host;
  AllocationCache allocations;
};

// Never destroyed: a C caller may still call in from an atexit handler or another thread after
// static destructors have run.
Session& session() {
  static Session* instance = new Session;
  return *instance;
}

// Built in place so that handle i is &table[i] without a dynamic allocation.
struct HandleTable {
  nvmlDevice_st slots[kMaxGpus];
  HandleTable() {
    for (std::size_t i = 0; i < kMaxGpus; ++i) slots[i].index = static_cast<unsigned int>(i);
  }
};

HandleTable& handles() {
  static HandleTable table;
  return table;
}

}  // namespace

Call::Call() : lock_(session().mutex) {}

int& Call::init_count() { return session().init_count; }

std::string Call::host_path() {
  const char* path = std::getenv(kHostEnv);
  return path ? std::string(path) : std::string();
}

nvmlReturn_t Call::host(const Host*& host, std::string* error) {
  const std::string path = host_path();
  if (path.empty()) {
    if (error) *error = std::string("fake NVML: ") + kHostEnv + " is not set";
    return NVML_ERROR_DRIVER_NOT_LOADED;
  }
  const HostRead& read = session().host.current(path);
  if (error) *error = read.error;
  switch (read.status) {
    case HostRead::Status::ok:
      host = read.host.get();
      return NVML_SUCCESS;
    case HostRead::Status::missing:
      return NVML_ERROR_DRIVER_NOT_LOADED;
    case HostRead::Status::malformed:
      break;
  }
  return NVML_ERROR_UNKNOWN;
}

std::vector<Allocation> Call::live_allocations(const std::string& uuid) {
  const std::string path = host_path();
  if (path.empty()) return {};
  return session().allocations.live_on(path, uuid);
}

nvmlDevice_t handle_of(unsigned int index) { return &handles().slots[index]; }

std::optional<unsigned int> index_of(nvmlDevice_t handle) {
  // Compare addresses as integers: relational comparison of unrelated pointers is unspecified.
  const auto first = reinterpret_cast<std::uintptr_t>(&handles().slots[0]);
  const auto address = reinterpret_cast<std::uintptr_t>(handle);
  if (address < first || address >= first + sizeof(HandleTable::slots)) return std::nullopt;
  if ((address - first) % sizeof(nvmlDevice_st) != 0) return std::nullopt;
  return static_cast<unsigned int>((address - first) / sizeof(nvmlDevice_st));
}

}  // namespace fake_nvml
