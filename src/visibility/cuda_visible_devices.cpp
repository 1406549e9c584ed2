// cuda_visible_devices.cpp — CUDA_VISIBLE_DEVICES read the way the CUDA driver reads it.
//
// The rules and their sources are in shared/reference/cuda-visible-devices.md. NVIDIA does not
// publish the driver's parser; the most careful public model of it is PyTorch's
// (torch/cuda/__init__.py: _parse_visible_devices, _device_count_nvml,
// _transform_uuid_to_ordinals, checked by its authors against a real driver), and this file
// follows that model, including its shape: two passes.
//
//   Pass 1 reads the *text*: entries are taken up to the first one that is not of the list's
//   kind (a negative number or a token with no leading digit in an integer list, a token without
//   the `GPU-` prefix in a UUID list). A repeated entry among those taken empties the whole list.
//   Pass 2 maps the entries to devices: it stops at the first integer not below the device count,
//   or the first UUID prefix that matches no device or several; a UUID list that names one device
//   twice through different prefixes is emptied too.
//
// So a repeat is caught even after an out-of-range integer ("0,9,1,1" on 8 GPUs is empty, not
// {0}): that is what PyTorch's model says the driver does, and the safer reading either way.
//
// Integer entries index CUDA's enumeration order. It equals NVML's (PCI bus) order when
// CUDA_DEVICE_ORDER=PCI_BUS_ID or when every GPU is the same model; otherwise CUDA sorts fastest
// first by a heuristic we cannot reproduce, so we report the PCI reading and say it is ambiguous
// rather than guess silently. UUID entries name devices directly and are never ambiguous.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "gpuslot/visibility.hpp"
#include "visibility/matching.hpp"
#include "visibility/slurm_grant.hpp"

namespace gpuslot {
namespace {

using namespace visibility_detail;

constexpr std::string_view kPciBusId = "PCI_BUS_ID";
constexpr std::string_view kFastestFirst = "FASTEST_FIRST";

constexpr const char* kAmbiguousIntegers =
    "GPUs of different models and CUDA_DEVICE_ORDER is not PCI_BUS_ID: CUDA numbers them fastest "
    "first, so integer CUDA ordinals cannot be mapped to nvidia-smi indices; set "
    "CUDA_DEVICE_ORDER=PCI_BUS_ID or use GPU UUIDs";
constexpr const char* kAmbiguousUnset =
    "GPUs of different models and CUDA_DEVICE_ORDER is not PCI_BUS_ID: CUDA numbers them fastest "
    "first, so CUDA ordinals cannot be mapped to nvidia-smi indices; set "
    "CUDA_DEVICE_ORDER=PCI_BUS_ID or list GPU UUIDs in CUDA_VISIBLE_DEVICES";

std::vector<std::string_view> split_commas(std::string_view text) {
  std::vector<std::string_view> tokens;
  std::size_t begin = 0;
  while (true) {
    const std::size_t comma = text.find(',', begin);
    if (comma == std::string_view::npos) {
      tokens.push_back(text.substr(begin));
      return tokens;
    }
    tokens.push_back(text.substr(begin, comma - begin));
    begin = comma + 1;
  }
}

// Unknown names (a GPU NVML could not read) are left out of the comparison: such a GPU is
// unhealthy and never a candidate, and flagging every degraded host as ambiguous would make the
// in-process ordinal unusable exactly when the other GPUs are still fine.
bool models_differ(const Snapshot& snapshot) {
  const std::string* first = nullptr;
  for (const GpuInfo& gpu : snapshot.gpus) {
    if (gpu.name.empty()) continue;
    if (first == nullptr) first = &gpu.name;
    else if (*first != gpu.name) return true;
  }
  return false;
}

// One integer entry as C's strtoul(token, &end, 10) reads it.
struct IntegerEntry {
  enum class Reading { ordinal, negative, no_digits };
  Reading reading = Reading::no_digits;
  std::uint64_t ordinal = 0;  // saturates, as strtoul saturates at ULONG_MAX
  bool ignored_text = false;  // characters after the digits, which CUDA ignores ("1abc")
};

IntegerEntry read_integer_entry(std::string_view token) {
  IntegerEntry entry;
  std::size_t i = 0;
  while (i < token.size() && is_c_space(token[i])) ++i;
  bool minus = false;
  if (i < token.size() && (token[i] == '+' || token[i] == '-')) minus = token[i++] == '-';
  const std::size_t digits_begin = i;
  constexpr std::uint64_t kMax = std::numeric_limits<std::uint64_t>::max();
  std::uint64_t value = 0;
  for (; i < token.size() && is_ascii_digit(token[i]); ++i) {
    const auto digit = static_cast<std::uint64_t>(token[i] - '0');
    value = value > (kMax - digit) / 10 ? kMax : value * 10 + digit;
  }
  if (i == digits_begin) return entry;
  // strtoul accepts "-N" and negates it; CUDA treats a negative entry as the end of the list.
  // "-0" is zero either way, so it names device 0 (PyTorch's model agrees).
  entry.reading = (minus && value != 0) ? IntegerEntry::Reading::negative : IntegerEntry::Reading::ordinal;
  entry.ordinal = value;
  entry.ignored_text = !trim_c_space(token.substr(i)).empty();
  return entry;
}

std::string gpu_count_phrase(std::size_t count) {
  if (count == 0) return "this host has no GPU";
  if (count == 1) return "only 1 GPU";
  return "only " + std::to_string(count) + " GPUs";
}

std::string stop_note(std::string_view token, const std::string& reason, std::size_t accepted) {
  std::string note =
      "CUDA_VISIBLE_DEVICES stops at invalid entry " + quoted(trim_c_space(token)) + " (" + reason + ")";
  if (accepted == 0) note += ": CUDA sees no GPU";
  return note;
}

bool looks_like_uuid(std::string_view token) {
  const std::string_view text = trim_c_space(token);
  return starts_with_ignoring_case(text, "GPU-") || starts_with_ignoring_case(text, "MIG-");
}

void read_integer_list(const Snapshot& snapshot, const std::vector<std::string_view>& tokens, Visibility& out,
                       std::vector<std::string>& notes) {
  struct Taken {
    std::string_view token;
    IntegerEntry entry;
  };
  std::vector<Taken> taken;
  std::string syntax_stop;  // why pass 1 stopped, if it did
  std::string_view stop_token;
  for (std::string_view token : tokens) {
    const IntegerEntry entry = read_integer_entry(token);
    if (entry.reading != IntegerEntry::Reading::ordinal) {
      stop_token = token;
      if (entry.reading == IntegerEntry::Reading::negative) syntax_stop = "negative";
      else if (trim_c_space(token).empty()) syntax_stop = "empty entry";
      else if (looks_like_uuid(token)) syntax_stop = "integers and UUIDs cannot be mixed";
      else syntax_stop = "not a number";
      break;
    }
    for (const Taken& earlier : taken) {
      if (earlier.entry.ordinal == entry.ordinal) {
        notes.push_back("CUDA_VISIBLE_DEVICES names device " + std::to_string(entry.ordinal) +
                        " twice: CUDA sees no GPU");
        return;
      }
    }
    taken.push_back({token, entry});
  }
  const std::size_t device_count = snapshot.gpus.size();
  for (const Taken& t : taken) {
    if (t.entry.ordinal >= device_count) {
      notes.push_back(stop_note(t.token, gpu_count_phrase(device_count), out.visible.size()));
      return;
    }
    out.visible.push_back(snapshot.gpus[t.entry.ordinal].nvml_index);
    if (t.entry.ignored_text) {
      notes.push_back("entry " + quoted(trim_c_space(t.token)) + " read as " + std::to_string(t.entry.ordinal) +
                      " (CUDA ignores what follows the digits)");
    }
  }
  if (!syntax_stop.empty()) notes.push_back(stop_note(stop_token, syntax_stop, out.visible.size()));
}

// UUID entries: white space around an entry is dropped and letter case is ignored. No source
// settles what the driver does with either (reference rule 7); we read them leniently, because a
// scheduler's `GPU-A, GPU-B` plainly means those GPUs, and say so in the note.
void read_uuid_list(const Snapshot& snapshot, const std::vector<std::string_view>& tokens, Visibility& out,
                    std::vector<std::string>& notes) {
  struct Taken {
    std::string_view token;  // as written, white space included
    std::string_view shown;  // trimmed, as typed
    std::string folded;      // lower case, for comparison
  };
  std::vector<Taken> taken;
  std::string syntax_stop;  // why pass 1 stopped, if it did
  std::string_view stop_token;
  for (std::string_view token : tokens) {
    const std::string_view text = trim_c_space(token);
    if (!starts_with_ignoring_case(text, "GPU-")) {
      stop_token = token;
      if (text.empty()) syntax_stop = "empty entry";
      else if (starts_with_ignoring_case(text, "MIG-")) syntax_stop = "GPU and MIG UUIDs cannot be mixed";
      else if (read_integer_entry(text).reading != IntegerEntry::Reading::no_digits)
        syntax_stop = "integers and UUIDs cannot be mixed";
      else syntax_stop = "not a GPU UUID";
      break;
    }
    std::string folded = lower_ascii(text);
    for (const Taken& earlier : taken) {
      if (earlier.folded == folded) {
        notes.push_back("CUDA_VISIBLE_DEVICES names " + quoted(text) + " twice: CUDA sees no GPU");
        return;
      }
    }
    taken.push_back({token, text, std::move(folded)});
  }
  std::string_view lenient;  // first accepted entry read only thanks to trimming or case folding
  for (const Taken& t : taken) {
    const std::vector<std::size_t> matches = gpus_with_uuid_prefix(snapshot, t.folded);
    if (matches.size() != 1) {
      const std::string reason = matches.empty() ? std::string("no GPU has that UUID")
                                                 : "matches " + std::to_string(matches.size()) + " GPUs";
      notes.push_back(stop_note(t.shown, reason, out.visible.size()));
      syntax_stop.clear();  // this entry comes first; the note names the first invalid entry only
      break;
    }
    const unsigned index = snapshot.gpus[matches.front()].nvml_index;
    const auto earlier = std::find(out.visible.begin(), out.visible.end(), index);
    if (earlier != out.visible.end()) {
      const Taken& first = taken[static_cast<std::size_t>(earlier - out.visible.begin())];
      out.visible.clear();
      notes.push_back("CUDA_VISIBLE_DEVICES names GPU " + std::to_string(index) + " twice (" + quoted(first.shown) +
                      " and " + quoted(t.shown) + "): CUDA sees no GPU");
      return;
    }
    out.visible.push_back(index);
    // NVML spells UUIDs "GPU-" + lower-case hex; anything else was read leniently.
    const bool nvml_spelling =
        t.shown.substr(0, 4) == "GPU-" && std::string_view(t.folded).substr(4) == t.shown.substr(4);
    if (lenient.empty() && (t.shown.size() != t.token.size() || !nvml_spelling)) lenient = t.token;
  }
  if (!syntax_stop.empty()) notes.push_back(stop_note(stop_token, syntax_stop, out.visible.size()));
  if (!lenient.empty()) {
    notes.push_back("entry " + quoted(lenient) +
                    " read ignoring surrounding white space and letter case (CUDA's own handling of "
                    "these is undocumented)");
  }
}

std::string joined(const std::vector<std::string>& notes) {
  std::string out;
  for (const std::string& note : notes) {
    if (!out.empty()) out += "; ";
    out += note;
  }
  return out;
}

}  // namespace

VisibilityEnv visibility_env_from_process() {
  VisibilityEnv env;
  if (const char* value = std::getenv("CUDA_VISIBLE_DEVICES")) env.cuda_visible_devices = value;
  if (const char* value = std::getenv("CUDA_DEVICE_ORDER")) env.cuda_device_order = value;
  if (const char* value = std::getenv("SLURM_JOB_ID")) env.slurm_job_id = value;
  if (const char* value = std::getenv("SLURM_STEP_GPUS")) env.slurm_step_gpus = value;
  if (const char* value = std::getenv("SLURM_JOB_GPUS")) env.slurm_job_gpus = value;
  return env;
}

bool Visibility::is_visible(unsigned nvml_index) const {
  return std::find(visible.begin(), visible.end(), nvml_index) != visible.end();
}

std::optional<unsigned> Visibility::cuda_ordinal_of(unsigned nvml_index) const {
  const auto found = std::find(visible.begin(), visible.end(), nvml_index);
  if (found == visible.end()) return std::nullopt;
  return static_cast<unsigned>(found - visible.begin());
}

Visibility resolve_visibility(const Snapshot& snapshot, const VisibilityEnv& env) {
  Visibility out;
  std::vector<std::string> notes;
  // CUDA compares the value exactly; anything else is its default, FASTEST_FIRST.
  const bool pci_order = env.cuda_device_order && *env.cuda_device_order == kPciBusId;
  if (env.cuda_device_order && !pci_order && !env.cuda_device_order->empty() &&
      *env.cuda_device_order != kFastestFirst) {
    notes.push_back("CUDA_DEVICE_ORDER=" + quoted(*env.cuda_device_order) +
                    " is neither PCI_BUS_ID nor FASTEST_FIRST; read as FASTEST_FIRST, CUDA's default");
  }
  const bool order_unknown = !pci_order && models_differ(snapshot);

  if (!env.cuda_visible_devices) {
    for (const GpuInfo& gpu : snapshot.gpus) out.visible.push_back(gpu.nvml_index);
    if (order_unknown) out.ambiguity = kAmbiguousUnset;
  } else {
    out.restricted = true;
    const std::string& value = *env.cuda_visible_devices;
    const std::vector<std::string_view> tokens = split_commas(value);
    const std::string_view first = trim_c_space(tokens.front());
    if (value.empty()) {
      notes.push_back("CUDA_VISIBLE_DEVICES is set but empty: CUDA sees no GPU");
    } else if (first.size() == 10 && starts_with_ignoring_case(first, "NoDevFiles")) {
      notes.push_back("CUDA_VISIBLE_DEVICES=NoDevFiles: the scheduler gave this job no GPU; CUDA sees no GPU");
    } else if (starts_with_ignoring_case(first, "MIG-")) {
      // gpuslot schedules whole GPUs. A MIG list names slices of GPUs whose memory and load NVML
      // reports per instance; treating the parent GPUs as free whole cards would be wrong.
      notes.push_back("CUDA_VISIBLE_DEVICES names MIG devices: MIG devices are not scheduled by gpuslot, so no "
                      "whole GPU is visible");
    } else if (starts_with_ignoring_case(first, "GPU-")) {
      read_uuid_list(snapshot, tokens, out, notes);
    } else {
      read_integer_list(snapshot, tokens, out, notes);
      if (order_unknown && !out.visible.empty()) out.ambiguity = kAmbiguousIntegers;
    }
  }
  if (!notes.empty()) out.note = joined(notes);
  apply_slurm_grant(snapshot, env, out);
  return out;
}

}  // namespace gpuslot
