// The one size parser and the one duration parser. Sizes are binary throughout: people who
// write `8GB` for a GPU mean what nvidia-smi shows, which is GiB.
#include "gpuslot/units.hpp"

#include <cctype>
#include <cmath>
#include <cstdio>
#include <string>

namespace gpuslot {
namespace {

std::string lower_trimmed(std::string_view text) {
  std::size_t begin = 0;
  std::size_t end = text.size();
  while (begin < end && std::isspace(static_cast<unsigned char>(text[begin]))) ++begin;
  while (end > begin && std::isspace(static_cast<unsigned char>(text[end - 1]))) --end;
  std::string out(text.substr(begin, end - begin));
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

// Splits "1.5gib" into the number 1.5 and the suffix "gib". Only plain decimals: no sign,
// no exponent, no hex, so `1e3` or `-4G` are rejected rather than read surprisingly.
bool split_number(const std::string& text, double& number, std::string& suffix) {
  std::size_t i = 0;
  bool digits = false;
  while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) { ++i; digits = true; }
  if (i < text.size() && text[i] == '.') {
    ++i;
    while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) { ++i; digits = true; }
  }
  if (!digits || i > 32) return false;
  number = std::strtod(text.substr(0, i).c_str(), nullptr);
  suffix = text.substr(i);
  while (!suffix.empty() && suffix.front() == ' ') suffix.erase(0, 1);
  return std::isfinite(number);
}

}  // namespace

Result<std::uint64_t> parse_size_bytes(std::string_view text) {
  const std::string shown = quote_for_message(text);
  auto bad = [&shown]() {
    return make_error(Errc::bad_input, "invalid size " + shown +
                                           ": expected a number with an optional unit, like 512M, 8G, 8GiB, "
                                           "0.5G or 1T (binary units; a bare number is MiB)");
  };
  double number = 0;
  std::string suffix;
  if (!split_number(lower_trimmed(text), number, suffix)) return bad();
  double multiplier = 0;
  if (suffix.empty() || suffix == "m" || suffix == "mb" || suffix == "mib") multiplier = double(kMiB);
  else if (suffix == "b") multiplier = 1;
  else if (suffix == "k" || suffix == "kb" || suffix == "kib") multiplier = 1024;
  else if (suffix == "g" || suffix == "gb" || suffix == "gib") multiplier = double(kGiB);
  else if (suffix == "t" || suffix == "tb" || suffix == "tib") multiplier = double(kGiB) * 1024;
  else return bad();
  const double bytes = number * multiplier;
  constexpr double kLimit = 1024.0 * 1024 * 1024 * 1024 * 1024;  // 1 PiB: more than any GPU
  if (bytes > kLimit) {
    return make_error(Errc::bad_input, "size " + shown + " is larger than 1 PiB; no GPU has that much memory");
  }
  return static_cast<std::uint64_t>(std::llround(bytes));
}

Result<std::chrono::milliseconds> parse_duration(std::string_view text) {
  const std::string shown = quote_for_message(text);
  double number = 0;
  std::string suffix;
  double unit_ms = 0;
  if (split_number(lower_trimmed(text), number, suffix)) {
    if (suffix.empty() || suffix == "s" || suffix == "sec") unit_ms = 1000;
    else if (suffix == "ms") unit_ms = 1;
    else if (suffix == "m" || suffix == "min") unit_ms = 60'000;
    else if (suffix == "h") unit_ms = 3'600'000;
    else if (suffix == "d") unit_ms = 86'400'000;
  }
  const double ms = number * unit_ms;
  if (unit_ms == 0 || ms > 1e12) {
    return make_error(Errc::bad_input, "invalid duration " + shown +
                                           ": expected a number of seconds or a number with a unit, like "
                                           "90, 1.5s, 250ms, 10m, 2h or 1d");
  }
  return std::chrono::milliseconds(static_cast<long long>(std::llround(ms)));
}

std::string format_gib(std::uint64_t bytes) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, "%.2f GiB", double(bytes) / double(kGiB));
  return buffer;
}

std::string format_size(std::uint64_t bytes) {
  char buffer[64];
  if (bytes >= kGiB) {
    const double gib = double(bytes) / double(kGiB);
    if (bytes % kGiB == 0) std::snprintf(buffer, sizeof buffer, "%.0f GiB", gib);
    else if (std::fabs(gib * 10 - std::round(gib * 10)) < 1e-9) std::snprintf(buffer, sizeof buffer, "%.1f GiB", gib);
    else std::snprintf(buffer, sizeof buffer, "%.2f GiB", gib);
  } else {
    std::snprintf(buffer, sizeof buffer, "%.0f MiB", double(bytes) / double(kMiB));
  }
  return buffer;
}

}  // namespace gpuslot
