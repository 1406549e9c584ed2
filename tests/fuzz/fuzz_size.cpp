// Fuzzes the one size parser and the one duration parser (units.hpp).
//
// Invariants: a size that parses is at most 1 PiB (the documented limit) and formats without
// trouble; a duration that parses is not negative; parsing is deterministic; every failure is
// Errc::bad_input with a one-line message (DESIGN.md "Bad input": a one-line error).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "gpuslot/units.hpp"

namespace {

void check(bool condition) {
  if (!condition) std::abort();
}

bool one_line(const std::string& text) { return !text.empty() && text.find('\n') == std::string::npos; }

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace gpuslot;
  const std::string_view text(reinterpret_cast<const char*>(data), size);

  const Result<std::uint64_t> bytes = parse_size_bytes(text);
  if (bytes.ok()) {
    check(*bytes <= 1024 * 1024 * kGiB);
    check(!format_gib(*bytes).empty());
    check(!format_size(*bytes).empty());
    const Result<std::uint64_t> again = parse_size_bytes(text);
    check(again.ok() && *again == *bytes);
  } else {
    check(bytes.error().code == Errc::bad_input);
    check(one_line(bytes.error().message));
  }

  const Result<std::chrono::milliseconds> duration = parse_duration(text);
  if (duration.ok()) {
    check(duration->count() >= 0);
    const Result<std::chrono::milliseconds> again = parse_duration(text);
    check(again.ok() && *again == *duration);
  } else {
    check(duration.error().code == Errc::bad_input);
    check(one_line(duration.error().message));
  }
  return 0;
}
