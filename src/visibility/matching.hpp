// matching.hpp — how the visibility layer reads device names typed by people and schedulers.
//
// Internal to src/visibility. One place for the three rules every parser here shares, so that
// CUDA_VISIBLE_DEVICES, device specs and `--exclude GPU-…` cannot drift apart:
//   * white space is C's isspace() in the "C" locale (what strtoul skips), never the locale's;
//   * GPU UUIDs compare case-insensitively (NVML prints lower-case hex; people paste upper-case);
//   * text echoed into a message is quoted on one line: control and non-ASCII bytes become \xNN
//     and very long text is cut, so a hostile or binary environment value cannot forge or flood
//     the one-line errors DESIGN.md promises.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "gpuslot/error.hpp"
#include "gpuslot/inventory.hpp"

namespace gpuslot::visibility_detail {

inline bool is_c_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r';
}

inline bool is_ascii_digit(char c) { return c >= '0' && c <= '9'; }

inline char lower_ascii(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

inline std::string_view trim_c_space(std::string_view text) {
  std::size_t begin = 0;
  std::size_t end = text.size();
  while (begin < end && is_c_space(text[begin])) ++begin;
  while (end > begin && is_c_space(text[end - 1])) --end;
  return text.substr(begin, end - begin);
}

inline std::string lower_ascii(std::string_view text) {
  std::string out(text);
  for (char& c : out) c = lower_ascii(c);
  return out;
}

inline bool starts_with_ignoring_case(std::string_view text, std::string_view prefix) {
  if (text.size() < prefix.size()) return false;
  for (std::size_t i = 0; i < prefix.size(); ++i) {
    if (lower_ascii(text[i]) != lower_ascii(prefix[i])) return false;
  }
  return true;
}

// `text` between single quotes, safe to put in a one-line message.
inline std::string quoted(std::string_view text) { return quote_for_message(text); }

// Positions in snapshot.gpus whose UUID starts with `prefix`, ignoring case. A GPU whose UUID
// NVML could not read (empty) matches nothing, not even an empty prefix.
inline std::vector<std::size_t> gpus_with_uuid_prefix(const Snapshot& snapshot, std::string_view prefix) {
  std::vector<std::size_t> matches;
  for (std::size_t i = 0; i < snapshot.gpus.size(); ++i) {
    const std::string& uuid = snapshot.gpus[i].uuid;
    if (!uuid.empty() && starts_with_ignoring_case(uuid, prefix)) matches.push_back(i);
  }
  return matches;
}

}  // namespace gpuslot::visibility_detail
