// common/utf8.hpp — UTF-8 well-formedness (internal to gpuslot).
//
// Command lines and jobs files are bytes from outside; JSON must be valid UTF-8. Well-formed is
// RFC 3629's: no overlong forms, no surrogates, nothing past U+10FFFF.
#pragma once

#include <cstddef>
#include <string_view>

namespace gpuslot::utf8 {

// The length of the well-formed sequence that starts `text` (1 for ASCII), or 0 if there is none;
// then `invalid` is how many bytes the longest ill-formed start spans (at least 1), the stretch
// one U+FFFD replaces. `text` must not be empty.
std::size_t sequence_length(std::string_view text, std::size_t* invalid = nullptr);
// The byte offset of the first ill-formed sequence, or npos if `text` is all well-formed.
std::size_t first_invalid(std::string_view text);

}  // namespace gpuslot::utf8
