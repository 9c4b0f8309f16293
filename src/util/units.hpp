// Durations and sizes as users write them in the config (docs/interface.md: "250ms", "10s", "5m",
// "1h", "7d" or a bare number of seconds; "512KiB", "64MiB", "1GiB" or a bare number of bytes).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "util/clock.hpp"

namespace tb {

// Returns nullopt and sets *error to a human sentence when the text is not a duration.
std::optional<Millis> parse_duration(std::string_view text, std::string* error);
std::optional<std::uint64_t> parse_size(std::string_view text, std::string* error);

// "40s", "2m30s", "1h", "250ms": short, for logs and STATUS= lines.
std::string format_duration(Millis d);
// "512 B", "1.5 KiB", "64.0 MiB".
std::string format_size(std::uint64_t bytes);

}  // namespace tb
