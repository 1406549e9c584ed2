// gpuslot/units.hpp — the one size parser and the one duration parser (STYLE.md rule 10).
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>

#include "gpuslot/error.hpp"

namespace gpuslot {

inline constexpr std::uint64_t kMiB = 1024ull * 1024ull;
inline constexpr std::uint64_t kGiB = 1024ull * kMiB;

// Parses a memory size into bytes. Accepted: `512M`, `8G`, `8GiB`, `8GB`, `0.5G`, `1T`, `100K`,
// `123B`; units are binary throughout (GB is read as GiB, as nvidia-smi users mean it), case
// does not matter, and a bare number is MiB. Rejects empty, negative, non-finite and sizes
// above 1 PiB with Errc::bad_input naming the accepted forms.
Result<std::uint64_t> parse_size_bytes(std::string_view text);

// Parses a duration: `90` (seconds), `1.5s`, `250ms`, `10m`, `2h`, `1d`.
Result<std::chrono::milliseconds> parse_duration(std::string_view text);

// `23.99 GiB` with two decimals: the form every human-facing line uses.
std::string format_gib(std::uint64_t bytes);

// `12 GiB`, `9.5 GiB`, `512 MiB`: shortest exact-looking form, for messages.
std::string format_size(std::uint64_t bytes);

}  // namespace gpuslot
