// report.cpp — the status, decision and lease documents and the per-GPU lines (api/report.hpp).
#include "api/report.hpp"

#include <algorithm>
#include <chrono>

#include "gpuslot/units.hpp"

namespace gpuslot::report {

namespace {

template <class T>
nlohmann::json or_null(const std::optional<T>& value) {
  return value ? nlohmann::json(*value) : nlohmann::json(nullptr);
}

const char* match_name(SlurmGrant::Match match) {
  switch (match) {
    case SlurmGrant::Match::minor_number: return "minor_number";
    case SlurmGrant::Match::cuda_visible_devices: return "cuda_visible_devices";
    case SlurmGrant::Match::none: return "none";
  }
  return "none";
}

nlohmann::json slurm_json(const Visibility& visibility) {
  if (!visibility.slurm) return nullptr;
  const SlurmGrant& grant = *visibility.slurm;
  const bool listed = !grant.source.empty();
  return {{"job_id", grant.job_id},
          {"source", listed ? nlohmann::json(grant.source) : nlohmann::json(nullptr)},
          {"listed", listed ? nlohmann::json(grant.listed) : nlohmann::json(nullptr)},
          {"numbers", grant.numbers},
          {"granted", grant.granted},
          {"matched_by", match_name(grant.matched_by)},
          {"note", or_null(grant.note)}};
}

std::string gpu_label(const GpuInfo& gpu) {
  return "GPU " + std::to_string(gpu.nvml_index) + " (" + (gpu.name.empty() ? "unknown model" : gpu.name) + ")";
}

}  // namespace

nlohmann::json status_json(const Snapshot& snapshot, const Visibility& visibility, const Decision& recommendation,
                           const nlohmann::json& leases_by_gpu) {
  nlohmann::json gpus = nlohmann::json::array();
  for (const auto& gpu : snapshot.gpus) {
    const GpuVerdict* verdict = gpu.nvml_index < recommendation.verdicts.size() ? &recommendation.verdicts[gpu.nvml_index] : nullptr;
    nlohmann::json processes = nlohmann::json::array();
    for (const auto& process : gpu.processes) {
      processes.push_back({{"pid", process.pid},
                           {"used_memory", or_null(process.used_bytes)},
                           {"user", or_null(process.user)},
                           {"command", or_null(process.command)}});
    }
    const std::string key = std::to_string(gpu.nvml_index);
    gpus.push_back({
        {"index", gpu.nvml_index},
        {"uuid", gpu.uuid},
        {"name", gpu.name},
        {"pci_bus_id", gpu.pci_bus_id},
        {"minor_number", or_null(gpu.minor_number)},
        {"memory",
         {{"total", or_null(gpu.memory_total_bytes)},
          {"used", or_null(gpu.memory_used_bytes)},
          {"free", or_null(gpu.memory_free_bytes)},
          {"reserved", verdict != nullptr ? nlohmann::json(verdict->reserved_bytes) : nlohmann::json(0)},
          {"available", verdict != nullptr ? or_null(verdict->available_bytes) : nlohmann::json(nullptr)},
          {"driver_reserved", or_null(gpu.memory_reserved_bytes)}}},
        {"utilization", {{"gpu", or_null(gpu.utilization_gpu_percent)}, {"memory", or_null(gpu.utilization_memory_percent)}}},
        {"temperature_c", or_null(gpu.temperature_c)},
        {"power_mw", or_null(gpu.power_mw)},
        {"healthy", gpu.healthy},
        {"health_error", gpu.healthy ? nlohmann::json(nullptr) : nlohmann::json(gpu.health_error)},
        {"visible", visibility.is_visible(gpu.nvml_index)},
        {"cuda_ordinal", visibility.ambiguity ? nlohmann::json(nullptr) : or_null(visibility.cuda_ordinal_of(gpu.nvml_index))},
        {"slurm_granted", visibility.slurm ? nlohmann::json(visibility.is_candidate(gpu.nvml_index)) : nlohmann::json(nullptr)},
        {"processes", std::move(processes)},
        {"leases", leases_by_gpu.contains(key) ? leases_by_gpu[key] : nlohmann::json::array()},
    });
  }
  return {
      {"driver_version", or_null(snapshot.driver_version)},
      {"cuda_driver_version", or_null(snapshot.cuda_driver_version)},
      {"gpus", std::move(gpus)},
      {"recommended", recommendation.fits() ? nlohmann::json(recommendation.chosen.front()) : nlohmann::json(nullptr)},
      {"cuda_visible_devices", visibility.restricted ? nlohmann::json(visibility.visible) : nlohmann::json(nullptr)},
      {"visibility_note", or_null(visibility.note)},
      {"ambiguity", or_null(visibility.ambiguity)},
      {"slurm", slurm_json(visibility)},
  };
}

std::string memory_line(const GpuInfo& gpu) {
  if (!gpu.healthy) return gpu_label(gpu) + ": unhealthy: " + gpu.health_error;
  if (!gpu.memory_total_bytes) return gpu_label(gpu) + ": memory unknown";
  return gpu_label(gpu) + ": total " + format_gib(*gpu.memory_total_bytes) + ", used " +
         format_gib(gpu.memory_used_bytes.value_or(0)) + ", free " + format_gib(gpu.memory_free_bytes.value_or(0));
}

std::string verdict_line(const GpuInfo& gpu, const GpuVerdict& verdict, const Visibility& visibility) {
  std::string line = gpu_label(gpu);
  if (auto ordinal = visibility.cuda_ordinal_of(gpu.nvml_index); ordinal && !visibility.ambiguity) {
    line += " = cuda:" + std::to_string(*ordinal);
  }
  return line + ": " + verdict.reason;
}

nlohmann::json decision_json(const Decision& decision, const Snapshot& snapshot, const Visibility& visibility) {
  nlohmann::json chosen = nlohmann::json::array();
  for (unsigned index : decision.chosen) {
    chosen.push_back({{"index", index},
                      {"uuid", snapshot.gpus[index].uuid},
                      {"cuda_ordinal", visibility.ambiguity ? nlohmann::json(nullptr) : or_null(visibility.cuda_ordinal_of(index))},
                      {"available", or_null(decision.verdicts[index].available_bytes)}});
  }
  nlohmann::json verdicts = nlohmann::json::array();
  for (const auto& verdict : decision.verdicts) {
    verdicts.push_back({{"index", verdict.nvml_index},
                        {"chosen", verdict.chosen},
                        {"eligible", verdict.eligible},
                        {"available", or_null(verdict.available_bytes)},
                        {"reserved", verdict.reserved_bytes},
                        {"reason", verdict.reason}});
  }
  return {{"chosen", std::move(chosen)}, {"verdicts", std::move(verdicts)}, {"summary", decision.summary},
          {"warnings", decision.warnings}, {"fits", decision.fits()}};
}

namespace {

std::int64_t unix_ms_now() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace

nlohmann::json lease_json(const LeaseRecord& lease) {
  return {{"id", lease.id},
          {"user", lease.user},
          {"uid", lease.uid},
          {"pid", lease.holder_pid},
          // A batch scheduler's lease before its shepherd takes it over: pid 0, counted in full.
          {"pending", lease.holder_pid == 0 && !lease.expires_at_ms},
          {"gpu_uuids", lease.gpu_uuids},
          {"gpus", lease.nvml_indices},
          {"reserved", lease.reserved_bytes},
          {"in_use", lease.in_use_bytes},
          {"command", lease.command},
          {"taken_at_ms", lease.taken_at_ms},
          {"age_seconds", std::max<std::int64_t>(0, (unix_ms_now() - lease.taken_at_ms) / 1000)},
          {"expires_at_ms", lease.expires_at_ms ? nlohmann::json(*lease.expires_at_ms) : nlohmann::json(nullptr)},
          {"session", lease.holder_session}};
}

nlohmann::json leases_by_gpu(const std::vector<LeaseRecord>& leases, const Snapshot& snapshot) {
  nlohmann::json by_gpu = nlohmann::json::object();
  for (const auto& lease : leases) {
    for (const auto& uuid : lease.gpu_uuids) {
      if (const GpuInfo* gpu = snapshot.find_uuid(uuid)) by_gpu[std::to_string(gpu->nvml_index)].push_back(lease_json(lease));
    }
  }
  return by_gpu;
}

}  // namespace gpuslot::report
