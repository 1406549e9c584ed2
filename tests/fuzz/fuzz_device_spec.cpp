// Fuzzes device specs and UUID-prefix lookup.
//
// Invariants: a spec that parses is one of the documented forms and survives a round trip
// through its canonical spelling; a spec that does not parse is Errc::bad_input with the one-line
// "invalid device '…': expected …" message; a UUID lookup that succeeds names a GPU whose UUID
// starts with the prefix (ignoring case), and one that fails is bad_input on one line.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "gpuslot/visibility.hpp"
#include "unit/visibility/hand_made_snapshots.hpp"

namespace {

void check(bool condition) {
  if (!condition) std::abort();
}

bool one_line(const std::string& text) { return !text.empty() && text.find('\n') == std::string::npos; }

char lower(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

std::string canonical(const gpuslot::DeviceSpec& spec) {
  using Kind = gpuslot::DeviceSpec::Kind;
  switch (spec.kind) {
    case Kind::automatic: return "auto";
    case Kind::cuda_any: return "cuda";
    case Kind::cuda_ordinal: return "cuda:" + std::to_string(spec.ordinal);
    case Kind::cpu: return "cpu";
    case Kind::uuid: return spec.uuid_prefix;
  }
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace gpuslot;
  static const Snapshot host = test::eight_a100s();
  const std::string text(reinterpret_cast<const char*>(data), size);

  const Result<DeviceSpec> spec = parse_device_spec(text);
  if (spec.ok()) {
    if (spec->kind == DeviceSpec::Kind::uuid) {
      check(spec->uuid_prefix.size() > 4 && spec->uuid_prefix.compare(0, 4, "GPU-") == 0);
      for (std::size_t i = 4; i < spec->uuid_prefix.size(); ++i) {
        const char c = spec->uuid_prefix[i];
        check((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || c == '-');
      }
    } else {
      check(spec->uuid_prefix.empty());
    }
    if (spec->kind != DeviceSpec::Kind::cuda_ordinal) check(spec->ordinal == 0);
    const Result<DeviceSpec> again = parse_device_spec(canonical(*spec));
    check(again.ok() && again->kind == spec->kind && again->ordinal == spec->ordinal &&
          again->uuid_prefix == spec->uuid_prefix);
  } else {
    check(spec.error().code == Errc::bad_input);
    check(one_line(spec.error().message));
    check(spec.error().message.rfind("invalid device '", 0) == 0);
  }

  const Result<unsigned> index = nvml_index_of_uuid_prefix(host, text);
  if (index.ok()) {
    check(*index < host.gpus.size());
    // The match ignores case and surrounding white space, so compare ignoring both.
    std::size_t begin = 0;
    std::size_t end = text.size();
    auto space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r'; };
    while (begin < end && space(text[begin])) ++begin;
    while (end > begin && space(text[end - 1])) --end;
    const std::string& uuid = host.gpus[*index].uuid;
    check(end - begin <= uuid.size());
    for (std::size_t i = begin; i < end; ++i) check(lower(text[i]) == lower(uuid[i - begin]));
  } else {
    check(index.error().code == Errc::bad_input);
    check(one_line(index.error().message));
  }
  return 0;
}
