// UTF-8 validity at the edges where it matters: the config loader refuses text that is not UTF-8
// (YAML streams are UTF-8), and what is handed to sd-bus or nlohmann_json must be valid, or
// sd-bus refuses the whole message and nlohmann_json's dump() throws (type_error.316).
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace tb::utf8 {

// The offset of the first byte that does not start or continue a valid character, or npos.
// Valid means what sd-bus accepts (systemd's utf8_is_valid): shortest form, no UTF-16
// surrogates, nothing above U+10FFFF, no non-characters (U+FDD0..U+FDEF, U+xxFFFE/U+xxFFFF).
std::size_t invalid_at(std::string_view s);
inline bool valid(std::string_view s) { return invalid_at(s) == std::string_view::npos; }

// `s` with each byte that is not part of a valid character replaced by U+FFFD.
std::string sanitized(std::string_view s);

// The longest prefix of `s` of at most `max` bytes that does not end inside a character.
std::string_view prefix(std::string_view s, std::size_t max);

}  // namespace tb::utf8
