// Fuzzes the fake NVML's host-file parser (tests/fake_nvml/host_file.h, parse_host).
//
// Every e2e test stands on that parser: a host file it misreads makes a GPU silently look empty
// or full, and a crash in it takes down gpuslot itself (the fake is loaded into its process). So
// whatever bytes the file holds:
//   * parse_host returns ok or malformed, never throws and never reports "missing";
//   * malformed: no host, and one line of error that names the file (the fake prints it to the
//     stderr of whoever loaded it, and gpuslot's "one-line error" promise covers that stream);
//   * ok: the schema's guarantees hold (UUIDs start with GPU-, at most kMaxGpus GPUs, pids are
//     not zero, MiB figures within the documented bound, a PCI bus id parsed from the text);
//   * parsing is deterministic, and writing the parsed host back out in the documented schema
//     and parsing that gives the same host (the schema has one meaning for every field).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <string>

#include "fake_nvml/host_file.h"

namespace {

using fake_nvml::Host;
using fake_nvml::HostGpu;
using fake_nvml::HostRead;

constexpr const char* kPath = "/fuzz/host.json";

void check(bool condition) {
  if (!condition) std::abort();
}

bool one_line(const std::string& text) { return !text.empty() && text.find('\n') == std::string::npos; }

// The host as the documented schema writes it (tests/fake_nvml/README.md).
nlohmann::json to_json(const Host& host) {
  nlohmann::json document = {{"driver_version", host.driver_version}, {"gpus", nlohmann::json::array()}};
  if (host.cuda_driver_version) document["cuda_driver_version"] = *host.cuda_driver_version;
  if (host.init_error) document["init_error"] = *host.init_error;
  for (const HostGpu& gpu : host.gpus) {
    nlohmann::json entry = {
        {"name", gpu.name},
        {"uuid", gpu.uuid},
        {"pci_bus_id", gpu.pci_bus_id},
        {"pci_device_id", gpu.pci_device_id},
        {"compute_capability",
         std::to_string(gpu.compute_capability_major) + "." + std::to_string(gpu.compute_capability_minor)},
        {"memory_total_mib", gpu.memory_total_bytes / fake_nvml::kMiB},
        {"memory_used_mib", gpu.memory_used_outside_processes_bytes / fake_nvml::kMiB},
        {"state", gpu.lost ? "lost" : "ok"},
        {"processes", nlohmann::json::array()},
    };
    if (gpu.utilization_gpu_percent) entry["utilization_gpu"] = *gpu.utilization_gpu_percent;
    if (gpu.utilization_memory_percent) entry["utilization_memory"] = *gpu.utilization_memory_percent;
    if (gpu.temperature_c) entry["temperature_c"] = *gpu.temperature_c;
    if (gpu.power_mw) entry["power_mw"] = *gpu.power_mw;
    for (const auto& process : gpu.processes) {
      entry["processes"].push_back({{"pid", process.pid}, {"used_mib", process.used_bytes / fake_nvml::kMiB}});
    }
    document["gpus"].push_back(std::move(entry));
  }
  return document;
}

bool same_gpu(const HostGpu& a, const HostGpu& b) {
  if (a.processes.size() != b.processes.size()) return false;
  for (std::size_t i = 0; i < a.processes.size(); ++i) {
    if (a.processes[i].pid != b.processes[i].pid || a.processes[i].used_bytes != b.processes[i].used_bytes) return false;
  }
  return a.name == b.name && a.uuid == b.uuid && a.pci_bus_id == b.pci_bus_id && a.pci_domain == b.pci_domain &&
         a.pci_bus == b.pci_bus && a.pci_device == b.pci_device && a.pci_device_id == b.pci_device_id &&
         a.memory_total_bytes == b.memory_total_bytes &&
         a.memory_used_outside_processes_bytes == b.memory_used_outside_processes_bytes &&
         a.utilization_gpu_percent == b.utilization_gpu_percent &&
         a.utilization_memory_percent == b.utilization_memory_percent && a.temperature_c == b.temperature_c &&
         a.power_mw == b.power_mw && a.compute_capability_major == b.compute_capability_major &&
         a.compute_capability_minor == b.compute_capability_minor && a.lost == b.lost;
}

bool same_host(const Host& a, const Host& b) {
  if (a.driver_version != b.driver_version || a.cuda_driver_version != b.cuda_driver_version ||
      a.init_error != b.init_error || a.gpus.size() != b.gpus.size()) {
    return false;
  }
  for (std::size_t i = 0; i < a.gpus.size(); ++i) {
    if (!same_gpu(a.gpus[i], b.gpus[i])) return false;
  }
  return true;
}

void check_schema(const Host& host) {
  check(host.gpus.size() <= fake_nvml::kMaxGpus);
  constexpr std::uint64_t kMaxBytes = (std::uint64_t{1} << 40) * fake_nvml::kMiB;  // "implausibly large" bound
  for (const HostGpu& gpu : host.gpus) {
    check(gpu.uuid.rfind("GPU-", 0) == 0);
    check(!gpu.pci_bus_id.empty());
    check(gpu.memory_total_bytes % fake_nvml::kMiB == 0 && gpu.memory_total_bytes <= kMaxBytes);
    check(gpu.memory_used_outside_processes_bytes % fake_nvml::kMiB == 0 &&
          gpu.memory_used_outside_processes_bytes <= kMaxBytes);
    check(gpu.compute_capability_major >= 0 && gpu.compute_capability_minor >= 0);
    for (const auto& process : gpu.processes) {
      check(process.pid != 0);
      check(process.used_bytes % fake_nvml::kMiB == 0 && process.used_bytes <= kMaxBytes);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);

  const HostRead read = fake_nvml::parse_host(text, kPath);
  check(read.status == HostRead::Status::ok || read.status == HostRead::Status::malformed);

  const HostRead again = fake_nvml::parse_host(text, kPath);
  check(again.status == read.status && again.error == read.error);

  if (read.status == HostRead::Status::malformed) {
    check(read.host == nullptr);
    check(one_line(read.error));
    check(read.error.rfind(std::string("fake NVML: host file ") + kPath, 0) == 0);
    return 0;
  }

  check(read.host != nullptr && read.error.empty());
  check(again.host != nullptr && same_host(*read.host, *again.host));
  check_schema(*read.host);

  const HostRead round_trip = fake_nvml::parse_host(to_json(*read.host).dump(), kPath);
  check(round_trip.status == HostRead::Status::ok);
  check(same_host(*read.host, *round_trip.host));
  return 0;
}
