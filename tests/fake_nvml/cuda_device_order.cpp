// cuda_device_order.cpp — CUDA's device numbering as fake-gpu-job needs it (see the header).
#include "cuda_device_order.h"

#include <algorithm>
#include <cctype>
#include <numeric>
#include <vector>

namespace fake_nvml {
namespace {

std::string trimmed(const std::string& text) {
  std::size_t begin = 0, end = text.size();
  while (begin < end && std::isspace(static_cast<unsigned char>(text[begin]))) ++begin;
  while (end > begin && std::isspace(static_cast<unsigned char>(text[end - 1]))) --end;
  return text.substr(begin, end - begin);
}

// Integer entries read like strtoul: leading blanks, an optional '+', the leading digits; the
// rest of the token is ignored. "-0" is 0; any other negative is invalid (so "-1" hides all).
std::optional<std::size_t> integer_entry(const std::string& token) {
  std::size_t i = 0;
  while (i < token.size() && std::isspace(static_cast<unsigned char>(token[i]))) ++i;
  bool negative = false;
  if (i < token.size() && (token[i] == '+' || token[i] == '-')) negative = token[i++] == '-';
  const std::size_t digits_begin = i;
  std::size_t value = 0;
  while (i < token.size() && std::isdigit(static_cast<unsigned char>(token[i]))) {
    value = value * 10 + static_cast<std::size_t>(token[i] - '0');
    if (value > 1'000'000) return std::nullopt;  // no host has that many GPUs
    ++i;
  }
  if (i == digits_begin || (negative && value != 0)) return std::nullopt;
  return value;
}

// A UUID entry selects the one GPU whose UUID starts with it (the full UUID included).
std::optional<std::size_t> uuid_entry(const Host& host, const std::string& token) {
  std::optional<std::size_t> found;
  for (std::size_t i = 0; i < host.gpus.size(); ++i) {
    if (host.gpus[i].uuid.compare(0, token.size(), token) == 0) {
      if (found) return std::nullopt;  // ambiguous prefix
      found = i;
    }
  }
  return found;
}

}  // namespace

std::optional<std::size_t> cuda_device_zero(const Host& host, const char* visible_devices, const char* device_order) {
  std::vector<std::size_t> cuda_order(host.gpus.size());
  std::iota(cuda_order.begin(), cuda_order.end(), std::size_t{0});
  const bool pci_order = device_order && std::string(device_order) == "PCI_BUS_ID";
  const bool identical = std::all_of(host.gpus.begin(), host.gpus.end(),
                                     [&](const HostGpu& gpu) { return gpu.name == host.gpus.front().name; });
  if (!pci_order && !identical) {
    std::stable_sort(cuda_order.begin(), cuda_order.end(), [&](std::size_t a, std::size_t b) {
      const HostGpu& x = host.gpus[a];
      const HostGpu& y = host.gpus[b];
      if (x.compute_capability_major != y.compute_capability_major) {
        return x.compute_capability_major > y.compute_capability_major;
      }
      return x.compute_capability_minor > y.compute_capability_minor;
    });
  }
  if (!visible_devices) {
    if (cuda_order.empty()) return std::nullopt;
    return cuda_order.front();
  }

  std::vector<std::size_t> visible;
  std::optional<bool> uuid_kind;  // decided by the first entry; the kinds cannot be mixed
  const std::string list(visible_devices);
  std::size_t begin = 0;
  while (begin <= list.size()) {
    const std::size_t comma = std::min(list.find(',', begin), list.size());
    const std::string token = trimmed(list.substr(begin, comma - begin));
    begin = comma + 1;
    const bool is_uuid = token.rfind("GPU-", 0) == 0;
    if (uuid_kind && *uuid_kind != is_uuid) break;
    uuid_kind = is_uuid;
    std::optional<std::size_t> nvml_index;
    if (is_uuid) {
      nvml_index = uuid_entry(host, token);
    } else if (auto ordinal = integer_entry(token); ordinal && *ordinal < cuda_order.size()) {
      nvml_index = cuda_order[*ordinal];
    }
    if (!nvml_index) break;  // MIG-…, NoDevFiles, -1, out of range, unknown: stop here
    if (std::find(visible.begin(), visible.end(), *nvml_index) != visible.end()) return std::nullopt;
    visible.push_back(*nvml_index);
  }
  if (visible.empty()) return std::nullopt;
  return visible.front();
}

}  // namespace fake_nvml
