#include "cli/report.hpp"

#include "gpuslot/units.hpp"

namespace gpuslot::cli {

namespace {

template <class T>
nlohmann::json or_null(const std::optional<T>& value) {
  return value ? nlohmann::json(*value) : nlohmann::json(nullptr);
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

}  // namespace gpuslot::cli
