// child_env.cpp — the one function that builds a child's GPU environment (STYLE.md rule 10).
//
// `run`, `batch` and the Python bindings all launch through here, so every child is told about
// its GPUs the same way:
//   CUDA_VISIBLE_DEVICES  the chosen GPUs, in the order given (the first is the child's cuda:0),
//                         as NVML indices or as full UUIDs;
//   CUDA_DEVICE_ORDER     always PCI_BUS_ID. With indices it is what makes them mean nvidia-smi's
//                         numbering; with UUIDs it is not needed for the child itself, but a child
//                         that spawns workers with its own integer CUDA_VISIBLE_DEVICES then gets
//                         the numbering nvidia-smi shows instead of FASTEST_FIRST's;
//   GPUSLOT_GPU_UUIDS     the same GPUs as UUIDs, for logs and for tools that match NVML output.
// The environment replaces the parent's CUDA_VISIBLE_DEVICES instead of nesting inside it: the
// indices are absolute NVML indices, and the policy only chose GPUs the parent could see.
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "gpuslot/visibility.hpp"

namespace gpuslot {
namespace {

const GpuInfo* gpu_with_index(const Snapshot& snapshot, unsigned nvml_index) {
  if (nvml_index < snapshot.gpus.size() && snapshot.gpus[nvml_index].nvml_index == nvml_index) {
    return &snapshot.gpus[nvml_index];
  }
  for (const GpuInfo& gpu : snapshot.gpus) {
    if (gpu.nvml_index == nvml_index) return &gpu;
  }
  return nullptr;
}

std::string comma_joined(const std::vector<std::string>& items) {
  std::string out;
  for (std::size_t i = 0; i < items.size(); ++i) {
    if (i > 0) out += ',';
    out += items[i];
  }
  return out;
}

}  // namespace

ChildGpuEnv child_gpu_env(const Snapshot& snapshot, const std::vector<unsigned>& nvml_indices, ExportFormat format) {
  // A repeat would make CUDA hide every GPU from the child; list each GPU once, first place wins.
  std::vector<unsigned> distinct;
  for (unsigned index : nvml_indices) {
    bool seen = false;
    for (unsigned earlier : distinct) seen = seen || earlier == index;
    if (!seen) distinct.push_back(index);
  }

  std::vector<std::string> indices;
  std::vector<std::string> uuids;
  bool every_uuid_known = true;
  for (unsigned index : distinct) {
    const GpuInfo* gpu = gpu_with_index(snapshot, index);
    const std::string uuid = gpu != nullptr ? gpu->uuid : std::string();
    every_uuid_known = every_uuid_known && !uuid.empty();
    indices.push_back(std::to_string(index));
    uuids.push_back(uuid);
  }

  // A GPU whose UUID NVML could not read cannot be named by UUID; the index form is just as
  // exact under PCI_BUS_ID, so fall back to it rather than write a list CUDA would cut short.
  const bool by_uuid = format == ExportFormat::uuid && every_uuid_known;
  ChildGpuEnv env;
  env.set.emplace_back("CUDA_VISIBLE_DEVICES", comma_joined(by_uuid ? uuids : indices));
  env.set.emplace_back("CUDA_DEVICE_ORDER", "PCI_BUS_ID");
  env.set.emplace_back("GPUSLOT_GPU_UUIDS", comma_joined(uuids));
  return env;
}

std::vector<std::string> child_environment(const char* const* base,
                                           const std::vector<std::pair<std::string, std::string>>& set) {
  std::unordered_map<std::string_view, std::size_t> last;  // name -> its last position in `set`
  for (std::size_t i = 0; i < set.size(); ++i) last[set[i].first] = i;
  std::vector<std::string> entries;
  for (const char* const* entry = base; entry != nullptr && *entry != nullptr; ++entry) {
    const std::string_view text = *entry;
    if (last.find(text.substr(0, text.find('='))) == last.end()) entries.emplace_back(text);
  }
  for (std::size_t i = 0; i < set.size(); ++i) {
    if (last[set[i].first] == i) entries.push_back(set[i].first + "=" + set[i].second);
  }
  return entries;
}

}  // namespace gpuslot
