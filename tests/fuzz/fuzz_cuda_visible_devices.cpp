// Fuzzes the CUDA_VISIBLE_DEVICES parser against fixed hosts: eight identical GPUs and four of
// two models, each with and without CUDA_DEVICE_ORDER=PCI_BUS_ID.
//
// Invariants (what every caller of resolve_visibility relies on):
//   * every visible index names a GPU of the host, and none is listed twice (CUDA never makes a
//     device visible twice: a repeat empties the list);
//   * cuda_ordinal_of() is the position in `visible`;
//   * `ambiguity` appears only on the mixed host without PCI_BUS_ID;
//   * the note is one line of bounded length, whatever bytes the variable holds;
//   * handing the result to a child through child_gpu_env and reading it back gives the same list.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>

#include "gpuslot/visibility.hpp"
#include "unit/visibility/hand_made_snapshots.hpp"

namespace {

void check(bool condition) {
  if (!condition) std::abort();
}

void check_one(const gpuslot::Snapshot& host, bool mixed, const std::string& value,
               const std::optional<std::string>& order) {
  using namespace gpuslot;
  const Visibility v = resolve_visibility(host, VisibilityEnv{value, order});
  check(v.restricted);
  check(v.visible.size() <= host.gpus.size());
  for (std::size_t k = 0; k < v.visible.size(); ++k) {
    check(v.visible[k] < host.gpus.size());
    for (std::size_t j = 0; j < k; ++j) check(v.visible[j] != v.visible[k]);
    check(v.cuda_ordinal_of(v.visible[k]) == static_cast<unsigned>(k));
  }
  const bool pci = order && *order == "PCI_BUS_ID";
  if (v.ambiguity) check(mixed && !pci && !v.visible.empty());
  if (v.note) {
    check(!v.note->empty());
    check(v.note->find('\n') == std::string::npos);
    check(v.note->size() < 4096);
  }
  for (ExportFormat format : {ExportFormat::index, ExportFormat::uuid}) {
    const ChildGpuEnv child = child_gpu_env(host, v.visible, format);
    VisibilityEnv seen;
    for (const auto& [name, text] : child.set) {
      if (name == "CUDA_VISIBLE_DEVICES") seen.cuda_visible_devices = text;
      if (name == "CUDA_DEVICE_ORDER") seen.cuda_device_order = text;
    }
    check(resolve_visibility(host, seen).visible == v.visible);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const gpuslot::Snapshot eight = gpuslot::test::eight_a100s();
  static const gpuslot::Snapshot mixed = gpuslot::test::mixed_host();
  const std::string value(reinterpret_cast<const char*>(data), size);
  const std::optional<std::string> orders[] = {std::nullopt, "PCI_BUS_ID"};
  for (const std::optional<std::string>& order : orders) {
    check_one(eight, false, value, order);
    check_one(mixed, true, value, order);
  }
  return 0;
}
