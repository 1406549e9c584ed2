#include "gpuslot/error.hpp"

namespace gpuslot {

int exit_code_of(Errc code) noexcept {
  switch (code) {
    case Errc::nothing_fits: return 1;
    case Errc::bad_input: return 2;
    case Errc::nvml_unavailable:
    case Errc::nvml_error: return 3;
    case Errc::state: return 4;
    case Errc::timeout: return 124;  // the convention of timeout(1)
    case Errc::internal: return 70;  // EX_SOFTWARE
  }
  return 70;
}

const char* errc_name(Errc code) noexcept {
  switch (code) {
    case Errc::nothing_fits: return "nothing_fits";
    case Errc::bad_input: return "bad_input";
    case Errc::nvml_unavailable: return "nvml_unavailable";
    case Errc::nvml_error: return "nvml_error";
    case Errc::state: return "state";
    case Errc::timeout: return "timeout";
    case Errc::internal: return "internal";
  }
  return "internal";
}

std::string quote_for_message(std::string_view text) {
  constexpr std::size_t kMaxShown = 64;
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out = "'";
  for (std::size_t i = 0; i < text.size() && i < kMaxShown; ++i) {
    const auto byte = static_cast<unsigned char>(text[i]);
    if (byte >= 0x20 && byte < 0x7f) {
      out += static_cast<char>(byte);
    } else {
      out += "\\x";
      out += kHex[byte >> 4];
      out += kHex[byte & 0xf];
    }
  }
  if (text.size() > kMaxShown) out += "...";
  out += "'";
  return out;
}

}  // namespace gpuslot
