// Table tests for the duration and size syntax of docs/interface.md.
#include "util/units.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <string>

namespace tb {
namespace {

using namespace std::chrono_literals;

struct DurationCase {
  const char* text;
  std::int64_t ms;
};

class DurationOk : public ::testing::TestWithParam<DurationCase> {};

TEST_P(DurationOk, Parses) {
  std::string error;
  const auto d = parse_duration(GetParam().text, &error);
  ASSERT_TRUE(d.has_value()) << GetParam().text << ": " << error;
  EXPECT_EQ(d->count(), GetParam().ms) << GetParam().text;
}

INSTANTIATE_TEST_SUITE_P(
    Units, DurationOk,
    ::testing::Values(DurationCase{"250ms", 250}, DurationCase{"10s", 10000},
                      DurationCase{"5m", 300000}, DurationCase{"1h", 3600000},
                      DurationCase{"7d", 604800000}, DurationCase{"30", 30000},  // bare = seconds
                      DurationCase{"0.5", 500}, DurationCase{"0", 0},
                      DurationCase{"0.1s", 100},  // exact, not 99
                      DurationCase{"1.5h", 5400000}, DurationCase{"2m30s", 150000},
                      DurationCase{"1h30m", 5400000}, DurationCase{"1s500ms", 1500},
                      DurationCase{"10 s", 10000}, DurationCase{" 10s ", 10000},
                      DurationCase{"0.0004", 0},  // rounds to the ms
                      DurationCase{"0.0005", 1}, DurationCase{"36500d", 3153600000000},
                      DurationCase{"0.999999999999999999d", 86400000}));

class DurationBad : public ::testing::TestWithParam<const char*> {};

TEST_P(DurationBad, IsRejectedWithASentence) {
  std::string error;
  EXPECT_FALSE(parse_duration(GetParam(), &error).has_value()) << GetParam();
  EXPECT_FALSE(error.empty());
}

INSTANTIATE_TEST_SUITE_P(Units, DurationBad,
                         ::testing::Values("", "  ", "-5s", "-1", "abc", "10x", "5min", "10S", "s",
                                           "1.2.3s", "30m1h", "1m1m", "1h30", "1e3", "36501d",
                                           "99999999999999999999999s", "0x10", "+5s", "5s!"));

TEST(Units, DurationErrorsSayWhy) {
  std::string error;
  parse_duration("-5s", &error);
  EXPECT_NE(error.find("negative"), std::string::npos) << error;
  parse_duration("5min", &error);
  EXPECT_NE(error.find("unknown duration unit 'min'"), std::string::npos) << error;
  parse_duration("", &error);
  EXPECT_NE(error.find("empty"), std::string::npos) << error;
  parse_duration("36501d", &error);
  EXPECT_NE(error.find("too long"), std::string::npos) << error;
  EXPECT_FALSE(parse_duration("x", nullptr).has_value());  // a null error pointer is allowed
}

struct SizeCase {
  const char* text;
  std::uint64_t bytes;
};

class SizeOk : public ::testing::TestWithParam<SizeCase> {};

TEST_P(SizeOk, Parses) {
  std::string error;
  const auto n = parse_size(GetParam().text, &error);
  ASSERT_TRUE(n.has_value()) << GetParam().text << ": " << error;
  EXPECT_EQ(*n, GetParam().bytes) << GetParam().text;
}

INSTANTIATE_TEST_SUITE_P(
    Units, SizeOk,
    ::testing::Values(SizeCase{"512KiB", 512 * 1024}, SizeCase{"64MiB", 64ull << 20},
                      SizeCase{"1GiB", 1ull << 30}, SizeCase{"2TiB", 2ull << 40},
                      SizeCase{"100B", 100}, SizeCase{"1024", 1024}, SizeCase{"0", 0},
                      SizeCase{"1.5KiB", 1536}, SizeCase{"1kB", 1000}, SizeCase{"1KB", 1000},
                      SizeCase{"2MB", 2000000}, SizeCase{"1GB", 1000000000},
                      SizeCase{"64 MiB", 64ull << 20}, SizeCase{"10 bytes", 10},
                      SizeCase{"18446744073709551615", UINT64_MAX},
                      // 18 fraction digits times 2^40: the product needs more than 64 bits
                      // (done without __int128, which 32-bit targets lack).
                      SizeCase{"1.999999999999999999TiB", 2ull << 40},
                      SizeCase{"0.123456789012345678TiB", 135742175047},
                      SizeCase{"16777215.5TiB", 18446743523953737728ull}));

class SizeBad : public ::testing::TestWithParam<const char*> {};

TEST_P(SizeBad, IsRejectedWithASentence) {
  std::string error;
  EXPECT_FALSE(parse_size(GetParam(), &error).has_value()) << GetParam();
  EXPECT_FALSE(error.empty());
}

INSTANTIATE_TEST_SUITE_P(Units, SizeBad,
                         ::testing::Values("", "-1", "-1KiB", "abc", "12XB", "1M", "1K", "1k", "1G",
                                           "1.5", "1.5B", "64MiB64", "1 2", "kib",
                                           "18446744073709551616", "16777216TiB", "1mib",
                                           "16777215.999999999999999999TiB"));

TEST(Units, SizeErrorsSayWhy) {
  std::string error;
  parse_size("1M", &error);
  EXPECT_NE(error.find("ambiguous"), std::string::npos) << error;
  EXPECT_NE(error.find("MiB"), std::string::npos) << error;
  parse_size("-1", &error);
  EXPECT_NE(error.find("negative"), std::string::npos) << error;
  parse_size("16777216TiB", &error);
  EXPECT_NE(error.find("too large"), std::string::npos) << error;
}

TEST(Units, FormatDuration) {
  EXPECT_EQ(format_duration(0ms), "0s");
  EXPECT_EQ(format_duration(40s), "40s");
  EXPECT_EQ(format_duration(150s), "2m30s");
  EXPECT_EQ(format_duration(1h), "1h");
  EXPECT_EQ(format_duration(250ms), "250ms");
  EXPECT_EQ(format_duration(1500ms), "1s500ms");
  EXPECT_EQ(format_duration(Millis(7ll * 24 * 3600 * 1000)), "7d");
  EXPECT_EQ(format_duration(-2s), "-2s");
  EXPECT_EQ(format_duration(Millis::min()).front(), '-');  // no overflow
}

TEST(Units, FormatDurationRoundTrips) {
  for (std::int64_t ms : {1ll, 999ll, 1000ll, 61001ll, 3600000ll, 90061001ll, 604800000ll}) {
    const auto back = parse_duration(format_duration(Millis(ms)), nullptr);
    ASSERT_TRUE(back.has_value()) << ms;
    EXPECT_EQ(back->count(), ms);
  }
}

TEST(Units, FormatSize) {
  EXPECT_EQ(format_size(0), "0 B");
  EXPECT_EQ(format_size(512), "512 B");
  EXPECT_EQ(format_size(1023), "1023 B");
  EXPECT_EQ(format_size(1536), "1.5 KiB");
  EXPECT_EQ(format_size(64ull << 20), "64.0 MiB");
  EXPECT_EQ(format_size(1ull << 30), "1.0 GiB");
  EXPECT_EQ(format_size((1ull << 20) - 1), "1.0 MiB");  // not "1024.0 KiB"
  EXPECT_EQ(format_size(UINT64_MAX), "16.0 EiB");
}

}  // namespace
}  // namespace tb
