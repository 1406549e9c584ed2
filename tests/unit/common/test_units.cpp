#include <gtest/gtest.h>

#include "gpuslot/units.hpp"

namespace gpuslot {
namespace {

struct SizeCase {
  const char* text;
  std::uint64_t bytes;
};

class ParseSizeAccepts : public ::testing::TestWithParam<SizeCase> {};

TEST_P(ParseSizeAccepts, ReadsBinaryUnits) {
  auto result = parse_size_bytes(GetParam().text);
  ASSERT_TRUE(result.ok()) << GetParam().text << ": " << result.error().message;
  EXPECT_EQ(*result, GetParam().bytes) << GetParam().text;
}

INSTANTIATE_TEST_SUITE_P(DesignSizes, ParseSizeAccepts,
                         ::testing::Values(SizeCase{"512M", 512 * kMiB}, SizeCase{"8G", 8 * kGiB},
                                           SizeCase{"8GiB", 8 * kGiB}, SizeCase{"8GB", 8 * kGiB},  // GB is GiB
                                           SizeCase{"0.5G", kGiB / 2}, SizeCase{"1T", 1024 * kGiB},
                                           SizeCase{"100", 100 * kMiB},  // bare number is MiB
                                           SizeCase{" 4g ", 4 * kGiB}, SizeCase{"1.5 GiB", 3 * kGiB / 2},
                                           SizeCase{"64K", 64 * 1024}, SizeCase{"123B", 123},
                                           SizeCase{"0", 0}));

class ParseSizeRejects : public ::testing::TestWithParam<const char*> {};

TEST_P(ParseSizeRejects, WithBadInputNamingAcceptedForms) {
  auto result = parse_size_bytes(GetParam());
  ASSERT_FALSE(result.ok()) << GetParam();
  EXPECT_EQ(result.error().code, Errc::bad_input);
  EXPECT_NE(result.error().message.find(GetParam()), std::string::npos);
}

INSTANTIATE_TEST_SUITE_P(Malformed, ParseSizeRejects,
                         ::testing::Values("", "G", "-4G", "8X", "1e3", "8GGB", "nan", "inf", ".", "2000T",
                                           "0x10", "8 G B"));

TEST(ParseSize, RejectsAbove1PiB) {
  auto result = parse_size_bytes("1025T");
  ASSERT_FALSE(result.ok());
  EXPECT_NE(result.error().message.find("1 PiB"), std::string::npos);
}

TEST(ParseDuration, AcceptsUnits) {
  EXPECT_EQ(parse_duration("90").value().count(), 90'000);
  EXPECT_EQ(parse_duration("1.5s").value().count(), 1'500);
  EXPECT_EQ(parse_duration("250ms").value().count(), 250);
  EXPECT_EQ(parse_duration("10m").value().count(), 600'000);
  EXPECT_EQ(parse_duration("2h").value().count(), 7'200'000);
  EXPECT_EQ(parse_duration("1d").value().count(), 86'400'000);
}

TEST(ParseDuration, RejectsGarbage) {
  for (const char* text : {"", "s", "-1", "5 parsecs", "1e9"}) {
    auto result = parse_duration(text);
    ASSERT_FALSE(result.ok()) << text;
    EXPECT_EQ(result.error().code, Errc::bad_input);
  }
}

TEST(FormatSize, ShortestReadableForm) {
  EXPECT_EQ(format_size(12 * kGiB), "12 GiB");
  EXPECT_EQ(format_size(9 * kGiB + kGiB / 2), "9.5 GiB");
  EXPECT_EQ(format_size(512 * kMiB), "512 MiB");
  EXPECT_EQ(format_gib(kGiB * 3 / 4), "0.75 GiB");
}

TEST(ExitCodes, MatchDesign) {
  EXPECT_EQ(exit_code_of(Errc::nothing_fits), 1);
  EXPECT_EQ(exit_code_of(Errc::bad_input), 2);
  EXPECT_EQ(exit_code_of(Errc::nvml_unavailable), 3);
  EXPECT_EQ(exit_code_of(Errc::nvml_error), 3);
  EXPECT_EQ(exit_code_of(Errc::timeout), 124);
}

}  // namespace
}  // namespace gpuslot
