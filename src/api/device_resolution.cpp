// device_resolution.cpp — a device setting resolved to `cuda:N` or `cpu` (api/device_resolution.hpp).
#include "api/device_resolution.hpp"

#include <cstdlib>
#include <utility>

#include "api/report.hpp"

namespace gpuslot::api {

Result<DeviceSetting> read_device_setting(const std::optional<std::string>& spec, const std::string& env_name) {
  DeviceSetting setting;
  setting.source = "argument";
  if (spec) {
    setting.text = *spec;
  } else {
    const char* from_env = env_name.empty() ? nullptr : std::getenv(env_name.c_str());
    if (from_env != nullptr && *from_env != '\0') {
      setting.text = from_env;
      setting.source = env_name;
    } else {
      setting.text = "auto";
      setting.source = "default";
    }
  }
  auto parsed = parse_device_spec(setting.text);
  if (!parsed) {
    Error error = std::move(parsed).error();
    if (setting.source != "argument") error.message += " (from " + setting.source + ")";
    return error;
  }
  setting.spec = *parsed;
  return setting;
}

Result<ResolvedDevice> resolve_device_setting(const DeviceSetting& setting, const DeviceResolver& resolver) {
  ResolvedDevice resolved;
  auto cpu = [&resolved, &resolver](const std::string& why) {
    resolver.say(why);
    resolved.device = "cpu";
    return resolved;
  };
  const DeviceSpec& spec = setting.spec;
  if (spec.kind == DeviceSpec::Kind::cpu) return cpu("device cpu requested (" + setting.source + "): using cpu");

  auto snapshot_result = resolver.snapshot();
  if (!snapshot_result) {
    if (spec.kind == DeviceSpec::Kind::automatic && snapshot_result.error().code == Errc::nvml_unavailable) {
      resolver.say("no NVIDIA driver: " + snapshot_result.error().message);
      return cpu("auto: using cpu");
    }
    return std::move(snapshot_result).error();
  }
  const Snapshot& snapshot = *snapshot_result;
  const Visibility visibility = resolver.visibility(snapshot);
  // Inside a Slurm job a visible GPU the job was not granted is no more usable than a hidden one.
  const std::vector<unsigned> usable = visibility.candidates();
  const std::string not_granted =
      !visibility.visible.empty() && visibility.slurm ? visibility.slurm->label() + " was granted none" : "";
  if (spec.kind == DeviceSpec::Kind::automatic && usable.empty()) {
    resolver.say(snapshot.gpus.empty()   ? "no NVIDIA GPU on this host"
                 : !not_granted.empty() ? "no GPU for this process: " + not_granted
                                        : "no GPU is visible to this process (CUDA_VISIBLE_DEVICES)");
    return cpu("auto: using cpu");
  }
  if (usable.empty()) {
    return make_error(Errc::nvml_unavailable, "device " + setting.text + " needs a GPU, but " +
                                                  (snapshot.gpus.empty()   ? std::string("this host has none")
                                                   : !not_granted.empty() ? not_granted
                                                                          : "CUDA_VISIBLE_DEVICES hides every GPU"));
  }
  if (visibility.ambiguity) return make_error(Errc::bad_input, *visibility.ambiguity);

  const std::string restriction =
      spec.kind == DeviceSpec::Kind::cuda_ordinal || spec.kind == DeviceSpec::Kind::uuid ? setting.text : std::string();
  auto candidates = restrict_to_device(restriction, snapshot, visibility);  // bad specs fail here, before any line
  if (!candidates) return std::move(candidates).error();
  for (unsigned index : usable) resolver.say(report::memory_line(snapshot.gpus[index]));

  auto decided = resolver.decide(snapshot, *candidates);
  if (!decided) return std::move(decided).error();
  const Decision& decision = resolved.decision.emplace(std::move(*decided));
  if (!decision.fits()) {
    for (unsigned index : candidates->candidates()) {
      resolved.verdict_lines.push_back(report::verdict_line(snapshot.gpus[index], decision.verdicts[index], visibility));
      resolver.say(resolved.verdict_lines.back());
    }
    return resolved;
  }
  const unsigned chosen = decision.chosen.front();
  const unsigned ordinal = visibility.cuda_ordinal_of(chosen).value_or(0);
  resolver.say("chosen: cuda:" + std::to_string(ordinal) + " = GPU " + std::to_string(chosen) + " (" +
               snapshot.gpus[chosen].name + "), " + decision.verdicts[chosen].reason + " [" + setting.text + " from " +
               setting.source + "]");
  resolved.device = "cuda:" + std::to_string(ordinal);
  resolved.nvml_index = chosen;
  resolved.uuid = snapshot.gpus[chosen].uuid;
  resolved.cuda_ordinal = ordinal;
  return resolved;
}

}  // namespace gpuslot::api
