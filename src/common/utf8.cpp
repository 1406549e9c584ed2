// common/utf8.cpp — see utf8.hpp.
#include "common/utf8.hpp"

namespace gpuslot::utf8 {

std::size_t sequence_length(std::string_view text, std::size_t* invalid) {
  const auto byte = static_cast<unsigned char>(text[0]);
  if (byte < 0x80) return 1;
  std::size_t length = 0;
  unsigned low = 0x80, high = 0xbf;  // bounds of the second byte
  if (byte >= 0xc2 && byte <= 0xdf) {
    length = 2;
  } else if (byte >= 0xe0 && byte <= 0xef) {
    length = 3;
    if (byte == 0xe0) low = 0xa0;   // overlong
    if (byte == 0xed) high = 0x9f;  // surrogates
  } else if (byte >= 0xf0 && byte <= 0xf4) {
    length = 4;
    if (byte == 0xf0) low = 0x90;   // overlong
    if (byte == 0xf4) high = 0x8f;  // past U+10FFFF
  }
  std::size_t valid = length == 0 ? 0 : 1;
  while (valid > 0 && valid < length && valid < text.size()) {
    const auto next = static_cast<unsigned char>(text[valid]);
    if (next < (valid == 1 ? low : 0x80u) || next > (valid == 1 ? high : 0xbfu)) break;
    ++valid;
  }
  if (length > 0 && valid == length) return length;
  if (invalid != nullptr) *invalid = valid > 0 ? valid : 1;
  return 0;
}

std::size_t first_invalid(std::string_view text) {
  for (std::size_t at = 0; at < text.size();) {
    const std::size_t length = sequence_length(text.substr(at));
    if (length == 0) return at;
    at += length;
  }
  return std::string_view::npos;
}

}  // namespace gpuslot::utf8
