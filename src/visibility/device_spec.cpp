// device_spec.cpp — the device settings services write (`…_DEVICE=auto|cuda|cuda:N|cpu|GPU-<uuid>`)
// the lookup of a GPU by UUID prefix, and the narrowing of a visibility to the GPU a setting names.
//
// The accepted set is deliberately small and closed: a service's config that says `gpu`, `0` or
// `cuda: 1` is a typo we report with the accepted forms, not a guess we make. Keywords ignore
// case and surrounding white space, because those come from shell variables and YAML files.
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "gpuslot/visibility.hpp"
#include "visibility/matching.hpp"

namespace gpuslot {
namespace {

using namespace visibility_detail;

bool is_uuid_char(char c) {
  const char lower = lower_ascii(c);
  return is_ascii_digit(c) || (lower >= 'a' && lower <= 'f') || c == '-';
}

// Decimal digits only, no sign, no white space, within `unsigned`.
std::optional<unsigned> parse_ordinal(std::string_view digits) {
  if (digits.empty()) return std::nullopt;
  unsigned long long value = 0;
  for (char c : digits) {
    if (!is_ascii_digit(c)) return std::nullopt;
    value = value * 10 + static_cast<unsigned long long>(c - '0');
    if (value > std::numeric_limits<unsigned>::max()) return std::nullopt;
  }
  return static_cast<unsigned>(value);
}

}  // namespace

Result<DeviceSpec> parse_device_spec(std::string_view text) {
  const std::string_view trimmed = trim_c_space(text);
  const std::string folded = lower_ascii(trimmed);
  DeviceSpec spec;
  if (folded == "auto") {
    spec.kind = DeviceSpec::Kind::automatic;
    return spec;
  }
  if (folded == "cuda") {
    spec.kind = DeviceSpec::Kind::cuda_any;
    return spec;
  }
  if (folded == "cpu") {
    spec.kind = DeviceSpec::Kind::cpu;
    return spec;
  }
  if (folded.starts_with("cuda:")) {
    if (const std::optional<unsigned> ordinal = parse_ordinal(std::string_view(folded).substr(5))) {
      spec.kind = DeviceSpec::Kind::cuda_ordinal;
      spec.ordinal = *ordinal;
      return spec;
    }
  } else if (folded.starts_with("gpu-") && folded.size() > 4) {
    const std::string_view rest = std::string_view(folded).substr(4);
    bool all_uuid_chars = true;
    for (char c : rest) all_uuid_chars = all_uuid_chars && is_uuid_char(c);
    if (all_uuid_chars) {
      spec.kind = DeviceSpec::Kind::uuid;
      spec.uuid_prefix = "GPU-" + std::string(rest);  // NVML's spelling: "GPU-" + lower-case hex
      return spec;
    }
  }
  return make_error(Errc::bad_input,
                    "invalid device " + quoted(text) + ": expected auto, cuda, cuda:N, cpu or GPU-<uuid>");
}

Result<unsigned> nvml_index_of_uuid_prefix(const Snapshot& snapshot, std::string_view prefix) {
  const std::string_view trimmed = trim_c_space(prefix);
  if (trimmed.empty()) return make_error(Errc::bad_input, "empty GPU UUID: expected GPU-<uuid>");
  const std::vector<std::size_t> matches = gpus_with_uuid_prefix(snapshot, trimmed);
  if (matches.empty()) {
    return make_error(Errc::bad_input, "no GPU has a UUID starting with " + quoted(trimmed));
  }
  if (matches.size() > 1) {
    std::string which;
    for (std::size_t position : matches) {
      if (!which.empty()) which += ", ";
      which += "GPU " + std::to_string(snapshot.gpus[position].nvml_index);
    }
    return make_error(Errc::bad_input, quoted(trimmed) + " matches " + std::to_string(matches.size()) + " GPUs (" +
                                           which + "); give more of the UUID");
  }
  return snapshot.gpus[matches.front()].nvml_index;
}

Result<Visibility> restrict_to_device(std::string_view spec_text, const Snapshot& snapshot, Visibility visibility,
                                      std::string_view setting) {
  if (visibility.restricted && visibility.ambiguity) return make_error(Errc::bad_input, *visibility.ambiguity);
  if (spec_text.empty()) return visibility;
  auto parsed = parse_device_spec(spec_text);
  if (!parsed) return std::move(parsed).error();
  const DeviceSpec spec = *parsed;
  const std::string text(spec_text);
  auto only = [&visibility, &text, setting](unsigned index) -> Result<Visibility> {
    if (visibility.slurm && !visibility.is_candidate(index)) {
      return make_error(Errc::bad_input, "device " + text + " is GPU " + std::to_string(index) + ", which " +
                                             visibility.slurm->label() + " was not granted");
    }
    visibility.visible = {index};
    visibility.restricted = true;
    visibility.restricted_by = std::string(setting) + " " + text;
    return visibility;
  };
  switch (spec.kind) {
    case DeviceSpec::Kind::automatic:
    case DeviceSpec::Kind::cuda_any: return visibility;
    case DeviceSpec::Kind::cpu:
      return make_error(Errc::bad_input,
                        std::string(setting) + " cpu asks for no GPU; expected auto, cuda, cuda:N or GPU-<uuid>");
    case DeviceSpec::Kind::cuda_ordinal:
      if (visibility.ambiguity) return make_error(Errc::bad_input, *visibility.ambiguity);
      if (spec.ordinal >= visibility.visible.size()) {
        const std::size_t count = visibility.visible.size();
        return make_error(Errc::bad_input, "device cuda:" + std::to_string(spec.ordinal) + " does not exist: " +
                                               std::to_string(count) + " GPU" + (count == 1 ? " is" : "s are") + " visible" +
                                               (visibility.slurm ? " in " + visibility.slurm->label() : "") +
                                               " (cuda:0 to cuda:" + std::to_string(count == 0 ? 0 : count - 1) + ")");
      }
      return only(visibility.visible[spec.ordinal]);
    case DeviceSpec::Kind::uuid: {
      auto index = nvml_index_of_uuid_prefix(snapshot, spec.uuid_prefix);
      if (!index) return std::move(index).error();
      if (!visibility.is_visible(*index)) {
        return make_error(Errc::bad_input, "device " + text + " is GPU " + std::to_string(*index) +
                                               ", which CUDA_VISIBLE_DEVICES hides from this process");
      }
      return only(*index);
    }
  }
  return visibility;
}

}  // namespace gpuslot
