#include "util/utf8.hpp"

namespace tb::utf8 {

namespace {

bool is_continuation(unsigned char c) { return (c & 0xC0) == 0x80; }

// The length of the valid character at s[at], or 0.
std::size_t char_length(std::string_view s, std::size_t at) {
  const auto c = static_cast<unsigned char>(s[at]);
  if (c < 0x80) return 1;
  std::size_t len = 0;
  char32_t cp = 0;
  if ((c & 0xE0) == 0xC0) {
    len = 2;
    cp = c & 0x1F;
  } else if ((c & 0xF0) == 0xE0) {
    len = 3;
    cp = c & 0x0F;
  } else if ((c & 0xF8) == 0xF0) {
    len = 4;
    cp = c & 0x07;
  } else {
    return 0;  // a continuation byte without a lead, or 0xF8..0xFF
  }
  if (s.size() - at < len) return 0;
  for (std::size_t i = 1; i < len; ++i) {
    const auto b = static_cast<unsigned char>(s[at + i]);
    if (!is_continuation(b)) return 0;
    cp = (cp << 6) | (b & 0x3F);
  }
  static constexpr char32_t kMinForLength[] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < kMinForLength[len]) return 0;                                    // overlong
  if (cp > 0x10FFFF) return 0;                                              // beyond Unicode
  if (cp >= 0xD800 && cp <= 0xDFFF) return 0;                               // UTF-16 surrogates
  if ((cp >= 0xFDD0 && cp <= 0xFDEF) || (cp & 0xFFFE) == 0xFFFE) return 0;  // non-characters
  return len;
}

}  // namespace

std::size_t invalid_at(std::string_view s) {
  for (std::size_t at = 0; at < s.size();) {
    const std::size_t len = char_length(s, at);
    if (len == 0) return at;
    at += len;
  }
  return std::string_view::npos;
}

std::string sanitized(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (std::size_t at = 0; at < s.size();) {
    const std::size_t len = char_length(s, at);
    if (len == 0) {
      out += "\xEF\xBF\xBD";  // U+FFFD REPLACEMENT CHARACTER
      ++at;
    } else {
      out.append(s.substr(at, len));
      at += len;
    }
  }
  return out;
}

std::string_view prefix(std::string_view s, std::size_t max) {
  if (s.size() <= max) return s;
  std::size_t end = max;
  // Back off over continuation bytes to the start of the character that does not fit.
  while (end > 0 && is_continuation(static_cast<unsigned char>(s[end]))) --end;
  return s.substr(0, end);
}

}  // namespace tb::utf8
