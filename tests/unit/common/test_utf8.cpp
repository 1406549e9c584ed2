// common/utf8: well-formed UTF-8 as RFC 3629 has it, checked against nlohmann's strict parser.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>

#include "common/utf8.hpp"

namespace gpuslot {
namespace {

bool nlohmann_accepts(const std::string& text) {
  return !nlohmann::json::parse("\"" + text + "\"", nullptr, /*allow_exceptions=*/false).is_discarded();
}

TEST(Utf8, BoundariesAgreeWithNlohmann) {
  const std::string cases[] = {
      "\x7f", "\xc2\x80", "\xdf\xbf", "\xe0\xa0\x80", "\xed\x9f\xbf", "\xee\x80\x80", "\xef\xbf\xbf",
      "\xf0\x90\x80\x80", "\xf4\x8f\xbf\xbf",                      // well-formed edges
      "\x80", "\xc0\x80", "\xc1\xbf", "\xc2", "\xc2\x7f", "\xe0\x9f\xbf", "\xed\xa0\x80",
      "\xf0\x8f\xbf\xbf", "\xf4\x90\x80\x80", "\xf5\x80\x80\x80", "\xff", "\xe2\x82",  // ill-formed
  };
  for (const std::string& text : cases) {
    const bool valid = utf8::first_invalid(text) == std::string::npos;
    EXPECT_EQ(valid, nlohmann_accepts(text)) << testing::PrintToString(text);
    EXPECT_EQ(utf8::sequence_length(text) == text.size(), valid) << testing::PrintToString(text);
  }
}

TEST(Utf8, FirstInvalidAndTheStretchOneReplacementCovers) {
  EXPECT_EQ(utf8::first_invalid("ok \xe2\x82\xac then \xff"), 12u);
  std::size_t invalid = 0;
  EXPECT_EQ(utf8::sequence_length("\xe2\x82x", &invalid), 0u);
  EXPECT_EQ(invalid, 2u) << "the longest ill-formed start";
  EXPECT_EQ(utf8::sequence_length("\xc0\xaf", &invalid), 0u);
  EXPECT_EQ(invalid, 1u) << "a byte that never starts a sequence";
  EXPECT_EQ(utf8::sequence_length("a"), 1u);
}

}  // namespace
}  // namespace gpuslot
