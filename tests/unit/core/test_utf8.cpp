// util/utf8: what may go to sd-bus and nlohmann_json, and where a message may be cut.
#include "util/utf8.hpp"

#include <gtest/gtest.h>

using namespace tb::utf8;

TEST(Utf8, Validity) {
  EXPECT_TRUE(valid(""));
  EXPECT_TRUE(valid("plain ascii"));
  EXPECT_TRUE(valid("K\xC3\xBChlraum \xE2\x84\x96 \xF0\x9F\x8C\xA1"));  // 2, 3 and 4 bytes
  EXPECT_EQ(invalid_at("pump-\xE9"), 5u);                               // Latin-1
  EXPECT_EQ(invalid_at("a\xC3"), 1u);                                   // cut short
  EXPECT_EQ(invalid_at("a\xC0\xAF"), 1u);                               // overlong '/'
  EXPECT_EQ(invalid_at("\xED\xA0\x80"), 0u);                            // UTF-16 surrogate
  EXPECT_EQ(invalid_at("\xF4\x90\x80\x80"), 0u);                        // above U+10FFFF
  EXPECT_EQ(invalid_at("\xEF\xBF\xBE"), 0u);                            // U+FFFE, a non-character
  EXPECT_EQ(invalid_at("x\x80"), 1u);                                   // a lone continuation byte
  EXPECT_EQ(invalid_at("\xFF"), 0u);
}

TEST(Utf8, SanitizedReplacesEachBadByte) {
  EXPECT_EQ(sanitized("ok \xC3\xA9"), "ok \xC3\xA9");
  EXPECT_EQ(sanitized("pump-\xE9"), "pump-\xEF\xBF\xBD");
  EXPECT_EQ(sanitized("\xFF\xFE!"), "\xEF\xBF\xBD\xEF\xBF\xBD!");
  EXPECT_TRUE(valid(sanitized("a\xC3")));
}

TEST(Utf8, PrefixCutsOnCharacterBoundaries) {
  EXPECT_EQ(prefix("abc", 10), "abc");
  EXPECT_EQ(prefix("abc", 2), "ab");
  EXPECT_EQ(prefix("a\xC3\xA9", 2), "a");       // would split 'é'
  EXPECT_EQ(prefix("a\xE2\x84\x96z", 3), "a");  // would split '№'
  EXPECT_EQ(prefix("a\xE2\x84\x96z", 4), "a\xE2\x84\x96");
  EXPECT_EQ(prefix("\xC3\xA9", 0), "");
}
