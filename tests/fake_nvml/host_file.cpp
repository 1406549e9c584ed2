// host_file.cpp — reads the JSON host description into plain values.
//
// The schema is strict (unknown types are errors, not zeros) because a typo in a test's host file
// should fail loudly with the field named, not make a GPU silently look empty.
#include "host_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <stdexcept>

namespace fake_nvml {
namespace {

using nlohmann::json;

// A schema violation; the message starts with the JSON path of the offending field.
struct SchemaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] void fail(const std::string& where, const std::string& what) {
  throw SchemaError(where + ": " + what);
}

// A field that is absent or null reads as "not given".
const json* field(const json& object, const char* key) {
  auto it = object.find(key);
  if (it == object.end() || it->is_null()) return nullptr;
  return &*it;
}

std::string string_field(const json& object, const char* key, const std::string& where) {
  const json* value = field(object, key);
  if (!value) fail(where + "." + key, "missing (expected a string)");
  if (!value->is_string()) fail(where + "." + key, "expected a string");
  return value->get<std::string>();
}

std::optional<std::uint64_t> optional_unsigned(const json& object, const char* key, const std::string& where) {
  const json* value = field(object, key);
  if (!value) return std::nullopt;
  if (!value->is_number_unsigned()) fail(where + "." + key, "expected a non-negative integer");
  return value->get<std::uint64_t>();
}

std::optional<unsigned int> optional_uint32(const json& object, const char* key, const std::string& where) {
  auto value = optional_unsigned(object, key, where);
  if (!value) return std::nullopt;
  if (*value > std::numeric_limits<unsigned int>::max()) fail(where + "." + key, "too large");
  return static_cast<unsigned int>(*value);
}

std::uint64_t mib_field(const json& object, const char* key, const std::string& where, bool required) {
  auto value = optional_unsigned(object, key, where);
  if (!value) {
    if (required) fail(where + "." + key, "missing (expected MiB as a non-negative integer)");
    return 0;
  }
  if (*value > (std::uint64_t{1} << 40)) fail(where + "." + key, "implausibly large");
  return *value * kMiB;
}

std::optional<int> optional_int(const json& object, const char* key, const std::string& where) {
  const json* value = field(object, key);
  if (!value) return std::nullopt;
  if (!value->is_number_integer()) fail(std::string(where) + "." + key, "expected an integer");
  const auto number = value->get<long long>();
  if (number < std::numeric_limits<int>::min() || number > std::numeric_limits<int>::max()) {
    fail(std::string(where) + "." + key, "out of range");
  }
  return static_cast<int>(number);
}

// NVML accepts "domain:bus:device.function" and "bus:device.function", all hex.
bool parse_pci_bus_id(const std::string& text, unsigned int& domain, unsigned int& bus, unsigned int& device) {
  unsigned int function = 0;
  int consumed = 0;
  if (std::sscanf(text.c_str(), "%x:%x:%x.%x%n", &domain, &bus, &device, &function, &consumed) == 4 &&
      static_cast<std::size_t>(consumed) == text.size()) {
    return true;
  }
  domain = 0;
  consumed = 0;
  return std::sscanf(text.c_str(), "%x:%x.%x%n", &bus, &device, &function, &consumed) == 3 &&
         static_cast<std::size_t>(consumed) == text.size();
}

HostGpu parse_gpu(const json& object, std::size_t index) {
  const std::string where = "gpus[" + std::to_string(index) + "]";
  if (!object.is_object()) fail(where, "expected an object");
  HostGpu gpu;
  gpu.name = string_field(object, "name", where);
  gpu.uuid = string_field(object, "uuid", where);
  if (gpu.uuid.rfind("GPU-", 0) != 0) fail(where + ".uuid", "must start with GPU-");

  if (field(object, "pci_bus_id")) {
    gpu.pci_bus_id = string_field(object, "pci_bus_id", where);
  } else {
    // Default: one GPU per PCI bus, starting at bus 1, as on most servers.
    char text[32];
    std::snprintf(text, sizeof text, "00000000:%02zX:00.0", index + 1);
    gpu.pci_bus_id = text;
  }
  if (!parse_pci_bus_id(gpu.pci_bus_id, gpu.pci_domain, gpu.pci_bus, gpu.pci_device)) {
    fail(where + ".pci_bus_id", "expected hex domain:bus:device.function, like 00000000:01:00.0");
  }
  if (const json* id = field(object, "pci_device_id")) {
    // Accept 0x2684 10DE as a number or as a hex string, whichever reads better in the file.
    if (id->is_number_unsigned() && id->get<std::uint64_t>() <= 0xFFFFFFFFu) {
      gpu.pci_device_id = static_cast<unsigned int>(id->get<std::uint64_t>());
    } else if (id->is_string()) {
      const std::string text = id->get<std::string>();
      char* end = nullptr;
      const unsigned long value = std::strtoul(text.c_str(), &end, 16);
      if (text.empty() || *end != '\0' || value > 0xFFFFFFFFul) fail(where + ".pci_device_id", "expected hex");
      gpu.pci_device_id = static_cast<unsigned int>(value);
    } else {
      fail(where + ".pci_device_id", "expected an integer or a hex string");
    }
  }

  // The kernel numbers /dev/nvidiaN in probe order, which need not be PCI order (Slurm's gres
  // docs): a host file may permute them to model that, or list a subset of GPUs with their
  // host-wide minors to model NVML inside a Slurm job's device cgroup.
  gpu.minor_number = optional_uint32(object, "minor_number", where).value_or(static_cast<unsigned int>(index));

  gpu.memory_total_bytes = mib_field(object, "memory_total_mib", where, true);
  gpu.memory_used_outside_processes_bytes = mib_field(object, "memory_used_mib", where, false);
  gpu.utilization_gpu_percent = optional_uint32(object, "utilization_gpu", where);
  gpu.utilization_memory_percent = optional_uint32(object, "utilization_memory", where);
  gpu.temperature_c = optional_uint32(object, "temperature_c", where);
  gpu.power_mw = optional_uint32(object, "power_mw", where);

  if (field(object, "compute_capability")) {
    const std::string cc = string_field(object, "compute_capability", where);
    int consumed = 0;
    if (std::sscanf(cc.c_str(), "%d.%d%n", &gpu.compute_capability_major, &gpu.compute_capability_minor,
                    &consumed) != 2 ||
        static_cast<std::size_t>(consumed) != cc.size() || gpu.compute_capability_major < 0 ||
        gpu.compute_capability_minor < 0) {
      fail(where + ".compute_capability", "expected \"MAJOR.MINOR\", like \"8.9\"");
    }
  }

  if (const json* processes = field(object, "processes")) {
    if (!processes->is_array()) fail(where + ".processes", "expected an array");
    for (std::size_t i = 0; i < processes->size(); ++i) {
      const std::string at = where + ".processes[" + std::to_string(i) + "]";
      const json& entry = (*processes)[i];
      if (!entry.is_object()) fail(at, "expected an object");
      auto pid = optional_uint32(entry, "pid", at);
      if (!pid || *pid == 0) fail(at + ".pid", "missing or zero");
      gpu.processes.push_back({*pid, mib_field(entry, "used_mib", at, true)});
    }
  }

  if (field(object, "state")) {
    const std::string state = string_field(object, "state", where);
    if (state == "lost") gpu.lost = true;
    else if (state != "ok") fail(where + ".state", "expected \"ok\" or \"lost\"");
  }
  return gpu;
}

}  // namespace

HostRead parse_host(const std::string& text, const std::string& path) {
  HostRead read;
  read.status = HostRead::Status::malformed;
  try {
    const json document = json::parse(text);
    if (!document.is_object()) fail("(top level)", "expected an object");
    auto host = std::make_shared<Host>();
    host->driver_version = string_field(document, "driver_version", "(top level)");
    host->cuda_driver_version = optional_int(document, "cuda_driver_version", "(top level)");
    host->init_error = optional_int(document, "init_error", "(top level)");
    const json* gpus = field(document, "gpus");
    if (!gpus || !gpus->is_array()) fail("gpus", "missing (expected an array)");
    if (gpus->size() > kMaxGpus) fail("gpus", "more than " + std::to_string(kMaxGpus) + " GPUs");
    for (std::size_t i = 0; i < gpus->size(); ++i) {
      HostGpu gpu = parse_gpu((*gpus)[i], i);
      for (std::size_t earlier = 0; earlier < host->gpus.size(); ++earlier) {
        if (host->gpus[earlier].minor_number == gpu.minor_number) {
          fail("gpus[" + std::to_string(i) + "].minor_number",
               "same as gpus[" + std::to_string(earlier) + "] (one device file per GPU)");
        }
      }
      host->gpus.push_back(std::move(gpu));
    }
    read.status = HostRead::Status::ok;
    read.host = std::move(host);
  } catch (const json::exception& error) {
    read.error = "fake NVML: host file " + path + " is not valid JSON: " + error.what();
  } catch (const SchemaError& error) {
    read.error = "fake NVML: host file " + path + ": " + error.what();
  }
  return read;
}

HostRead read_host_file(const std::string& path) {
  WatchedFile file;
  if (const auto refresh = file.refresh(path); refresh.error_number != 0) {
    HostRead read;
    read.error = "fake NVML: cannot read host file " + path + ": " + std::strerror(refresh.error_number);
    return read;
  }
  return parse_host(file.text(), path);
}

WatchedFile::~WatchedFile() { forget(); }

void WatchedFile::forget() {
  if (pinned_fd_ >= 0) ::close(pinned_fd_);
  pinned_fd_ = -1;
  loaded_ = false;
  text_.clear();
}

namespace {
FileIdentity identity_of(const struct stat& info) {
  return {info.st_dev, info.st_ino, info.st_size, info.st_mtim, info.st_ctim};
}
}  // namespace

WatchedFile::Refresh WatchedFile::refresh(const std::string& path) {
  if (recheck_after_ns_ <= 0) return refresh_now(path);
  timespec clock_now{};
  ::clock_gettime(CLOCK_MONOTONIC, &clock_now);
  const std::int64_t now_ns = std::int64_t(clock_now.tv_sec) * 1000000000 + clock_now.tv_nsec;
  if (checked_at_ns_ >= 0 && path == checked_path_ && now_ns - checked_at_ns_ < recheck_after_ns_) {
    return {checked_error_, false};
  }
  const Refresh result = refresh_now(path);
  checked_path_ = path;
  checked_at_ns_ = now_ns;
  checked_error_ = result.error_number;
  return result;
}

WatchedFile::Refresh WatchedFile::refresh_now(const std::string& path) {
  struct stat info{};
  if (::stat(path.c_str(), &info) != 0) {
    const int error = errno;
    forget();
    return {error, true};
  }
  if (loaded_ && path == path_ && identity_of(info) == identity_) return {0, false};

  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int error = errno;
    forget();
    return {error, true};
  }
  // Identity from the descriptor, not the earlier stat: the file may have been replaced between.
  if (::fstat(fd, &info) != 0) {
    const int error = errno;
    ::close(fd);
    forget();
    return {error, true};
  }
  std::string text;
  text.reserve(static_cast<std::size_t>(info.st_size));
  char buffer[65536];
  for (;;) {
    const ssize_t got = ::read(fd, buffer, sizeof buffer);
    if (got == 0) break;
    if (got < 0) {
      if (errno == EINTR) continue;
      const int error = errno;
      ::close(fd);
      forget();
      return {error, true};
    }
    text.append(buffer, static_cast<std::size_t>(got));
  }
  forget();
  pinned_fd_ = fd;
  path_ = path;
  identity_ = identity_of(info);
  text_ = std::move(text);
  loaded_ = true;
  return {0, true};
}

const HostRead& HostCache::current(const std::string& path) {
  const auto refresh = file_.refresh(path);
  if (refresh.error_number != 0) {
    parsed_ = HostRead{};
    parsed_.error = "fake NVML: cannot read host file " + path + ": " + std::strerror(refresh.error_number);
    return parsed_;
  }
  if (refresh.changed) {
    parsed_ = parse_host(file_.text(), path);
    // Once per version of the file, so a test's stderr is not flooded by every later call.
    if (parsed_.status == HostRead::Status::malformed) std::fprintf(stderr, "%s\n", parsed_.error.c_str());
  }
  return parsed_;
}

}  // namespace fake_nvml
