// Helpers for putting text that sources read (file contents, program output) into error
// messages: it can be anything, including binary garbage or megabytes, and messages end up in the
// journal and on D-Bus (LastError), so they are kept short and printable.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace tb::sources {

// At most `max` characters; control and non-ASCII bytes become '?', newlines and tabs a space;
// "…" marks a cut.
std::string printable(std::string_view text, std::size_t max = 40);

// The first non-blank line of `text`, trimmed, made printable (for stderr in error messages).
std::string first_line(std::string_view text, std::size_t max = 200);

// Trims ASCII whitespace at both ends.
std::string_view trim(std::string_view text);

}  // namespace tb::sources
