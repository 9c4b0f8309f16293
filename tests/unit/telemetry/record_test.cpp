#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <random>

#include <nlohmann/json.hpp>

#include "telemetry/record.hpp"

using namespace tb::telemetry;
using nlohmann::json;

TEST(Record, ThingsBoardShape) {
  Record r;
  r.ts_ms = 1700000000123;
  r.readings = {{"temp", 21.5}, {"on", true}, {"name", std::string("x")}, {"n", std::int64_t{42}}};
  EXPECT_EQ(encode_record(r),
            R"({"ts":1700000000123,"values":{"temp":21.5,"on":true,"name":"x","n":42}})");
  EXPECT_EQ(encode_values(r.readings), R"({"temp":21.5,"on":true,"name":"x","n":42})");
}

TEST(Record, ArraysOfRecords) {
  EXPECT_EQ(encode_records({}), "[]");
  Record a{1, "s", {{"a", std::int64_t{1}}}};
  Record b{2, "s", {{"a", std::int64_t{2}}}};
  EXPECT_EQ(encode_records({a}), R"([{"ts":1,"values":{"a":1}}])");
  EXPECT_EQ(encode_records({a, b}), R"([{"ts":1,"values":{"a":1}},{"ts":2,"values":{"a":2}}])");
  EXPECT_EQ(encode_record(Record{5, "s", {}}), R"({"ts":5,"values":{}})");
}

TEST(Record, StringsRoundTripThroughAJsonParser) {
  const std::string tricky[] = {"quote\"back\\slash",
                                "nl\ncr\rtab\tbs\bff\f",
                                std::string("nul\0one\x01us\x1f", 11),
                                "del\x7f",
                                "é ünïcödé ✓ 😀",
                                "/slash/",
                                ""};
  for (const auto& s : tricky) {
    const std::string out = encode_values({{s, s}});
    json j = json::parse(out);  // throws on invalid JSON
    ASSERT_TRUE(j.contains(s)) << out;
    EXPECT_EQ(j[s].get<std::string>(), s) << out;
  }
  EXPECT_EQ(encode_values({{"k", std::string("a\x01")}}), R"({"k":"a\u0001"})");
  EXPECT_EQ(encode_values({{"k", std::string("\"\\\n")}}), R"({"k":"\"\\\n"})");
}

TEST(Record, InvalidUtf8BecomesReplacementCharacter) {
  // Lone continuation, truncated sequence, overlong, surrogate, above U+10FFFF.
  const std::string bad[] = {"a\x80z", "a\xC3", "\xC0\xAF", "\xED\xA0\x80", "\xF4\x90\x80\x80"};
  for (const auto& s : bad) {
    const std::string out = encode_values({{"k", s}});
    json j;
    ASSERT_NO_THROW(j = json::parse(out)) << out;
    EXPECT_NE(j["k"].get<std::string>().find("\xEF\xBF\xBD"), std::string::npos) << out;
  }
  EXPECT_EQ(encode_values({{"k", std::string("a\x80z")}}), "{\"k\":\"a\xEF\xBF\xBDz\"}");
}

TEST(Record, IntegersStayIntegers) {
  EXPECT_EQ(encode_values({{"a", std::int64_t{0}}}), R"({"a":0})");
  EXPECT_EQ(encode_values({{"a", std::numeric_limits<std::int64_t>::max()}}),
            R"({"a":9223372036854775807})");
  EXPECT_EQ(encode_values({{"a", std::numeric_limits<std::int64_t>::min()}}),
            R"({"a":-9223372036854775808})");
  EXPECT_EQ(encode_values({{"a", false}}), R"({"a":false})");
}

TEST(Record, DoublesAreShortestAndStayDoubles) {
  EXPECT_EQ(encode_values({{"a", 0.1}}), R"({"a":0.1})");
  // An integral double keeps a fraction so ThingsBoard does not store it as a long.
  EXPECT_EQ(encode_values({{"a", 21.0}}), R"({"a":21.0})");
  EXPECT_EQ(encode_values({{"a", -0.0}}), R"({"a":-0.0})");
  EXPECT_EQ(encode_values({{"a", 1e300}}), R"({"a":1e+300})");
  EXPECT_EQ(encode_values({{"a", 5e-324}}), R"({"a":5e-324})");

  std::mt19937_64 rng(42);
  for (int i = 0; i < 20000; ++i) {
    std::uint64_t bits = rng();
    double d;
    std::memcpy(&d, &bits, sizeof d);
    if (!std::isfinite(d)) continue;
    const std::string out = encode_values({{"a", d}});
    const std::string num = out.substr(5, out.size() - 6);
    EXPECT_EQ(std::strtod(num.c_str(), nullptr), d) << num;
    EXPECT_TRUE(json::parse(out)["a"].is_number_float()) << out;
  }
}

TEST(Record, NanAndInfinityAreSkipped) {
  std::size_t n = 99;
  const std::vector<Reading> rs = {{"a", std::nan("")},
                                   {"b", 1.5},
                                   {"c", std::numeric_limits<double>::infinity()},
                                   {"d", -std::numeric_limits<double>::infinity()}};
  EXPECT_EQ(encode_values(rs, &n), R"({"b":1.5})");
  EXPECT_EQ(n, 1u);
  EXPECT_EQ(encode_values({{"a", std::nan("")}}, &n), "{}");
  EXPECT_EQ(n, 0u);
  EXPECT_FALSE(is_encodable(std::nan("")));
  EXPECT_TRUE(is_encodable(std::string("nan")));
}

TEST(Record, RecordSizeMatchesAppend) {
  for (std::int64_t ts : {std::int64_t{0}, std::int64_t{-5}, std::int64_t{1700000000123},
                          std::numeric_limits<std::int64_t>::min()}) {
    std::string out;
    append_record(out, ts, R"({"a":1})");
    EXPECT_EQ(out.size(), record_size(ts, 7));
  }
}

// The uploader keeps batches that share a (ts, key) out of flight together (docs/queue.md).
TEST(PointHashes, OnePerReadingAndEqualForTheSamePoint) {
  const Record a{1000, "s", {{"t", 1.5}, {"s", std::string("x\",\"y\":{")}, {"on", true}}};
  const Record b{1000, "s", {{"t", 2.5}}};
  const Record c{1001, "s", {{"t", 1.5}, {"u", std::int64_t{7}}}};
  const auto ab = point_hashes(encode_records({a, b}));
  const auto bc = point_hashes(encode_records({b, c}));
  const auto only_c = point_hashes(encode_records({c}));
  ASSERT_TRUE(ab && bc && only_c);
  ASSERT_EQ(ab->size(), 4u);  // t, s, on, t
  ASSERT_EQ(bc->size(), 3u);
  EXPECT_EQ((*ab)[0], (*ab)[3]) << "t@1000 twice";
  EXPECT_EQ((*ab)[0], (*bc)[0]);
  EXPECT_NE((*ab)[0], (*ab)[1]);
  EXPECT_NE((*bc)[0], (*bc)[1]) << "same key, another ts";
  for (const auto h : *only_c)
    for (const auto g : *ab) EXPECT_NE(h, g);
  EXPECT_EQ(point_hashes("[]")->size(), 0u);
  for (const char* bad : {"", "[", "{}", "[{\"ts\":1}]", "[{\"ts\":x,\"values\":{}}]",
                          "[{\"ts\":1,\"values\":{\"a\":1}}", "[{\"ts\":1,\"values\":{\"a\":1}}]x",
                          "[{\"ts\":1,\"values\":{\"a\"}}]", "[{\"ts\":1,\"values\":{\"a\":\"1}}]"})
    EXPECT_FALSE(point_hashes(bad)) << bad;
}
