#include "util/units.hpp"

#include <array>
#include <cstdio>
#include <limits>

namespace tb {

namespace {

// The parsers work in exact integer arithmetic: "0.1s" must be exactly 100 ms, which a double
// cannot promise. A fraction of up to 18 digits times a unit needs 128 bits for a moment; 32-bit
// targets (armhf) have no __int128, so that one product and division are done by hand.
struct Product {
  std::uint64_t high = 0;
  std::uint64_t low = 0;
};

Product multiply(std::uint64_t a, std::uint64_t b) {
  const std::uint64_t a_lo = a & 0xffffffffu, a_hi = a >> 32;
  const std::uint64_t b_lo = b & 0xffffffffu, b_hi = b >> 32;
  const std::uint64_t lo_lo = a_lo * b_lo, hi_lo = a_hi * b_lo;
  const std::uint64_t lo_hi = a_lo * b_hi, hi_hi = a_hi * b_hi;
  const std::uint64_t middle = (lo_lo >> 32) + (hi_lo & 0xffffffffu) + lo_hi;
  return {hi_hi + (hi_lo >> 32) + (middle >> 32), (middle << 32) | (lo_lo & 0xffffffffu)};
}

// floor(n / d) for d < 2^63 and a quotient that fits 64 bits (n.high < d): long division.
std::uint64_t divide(Product n, std::uint64_t d) {
  std::uint64_t remainder = n.high, quotient = 0;
  for (int bit = 63; bit >= 0; --bit) {
    remainder = (remainder << 1) | ((n.low >> bit) & 1u);
    quotient <<= 1;
    if (remainder >= d) {
      remainder -= d;
      quotient |= 1u;
    }
  }
  return quotient;
}

// Durations longer than this are certainly typos, and capping them keeps every later
// `now + duration` far from overflowing.
constexpr std::int64_t kMaxDurationMs = 36500ll * 24 * 3600 * 1000;  // 100 years

constexpr int kMaxFractionDigits = 18;

bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool is_alpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
bool is_space(char c) { return c == ' ' || c == '\t'; }

std::string_view trim(std::string_view s) {
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
  return s;
}

// Users' text is quoted back to them in error sentences; a long or binary value must not
// swamp the message.
std::string shown(std::string_view s) {
  std::string out = "'";
  for (std::size_t i = 0; i < s.size() && i < 40; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    out += (c < 0x20 || c == 0x7f) ? '?' : static_cast<char>(c);
  }
  if (s.size() > 40) out += "...";
  return out + "'";
}

void set_error(std::string* error, std::string message) {
  if (error) *error = std::move(message);
}

// A decimal number "123" or "1.25" read exactly: value = whole + fraction / 10^digits.
struct Decimal {
  std::uint64_t whole = 0;
  std::uint64_t fraction = 0;  // < scale
  std::uint64_t scale = 1;     // 10^(fraction digits), at most 10^18
  bool has_fraction() const { return fraction != 0; }
  // Rounded to the nearest integer after multiplying by `unit`; nullopt when over 64 bits.
  std::optional<std::uint64_t> times(std::uint64_t unit) const {
    std::uint64_t whole_part = 0;
    if (__builtin_mul_overflow(whole, unit, &whole_part)) return std::nullopt;
    // fraction * unit + scale / 2 < scale * (unit + 1): the quotient is at most unit.
    Product p = multiply(fraction, unit);
    const std::uint64_t half = scale / 2;
    p.low += half;
    if (p.low < half) ++p.high;
    std::uint64_t total = 0;
    if (__builtin_add_overflow(whole_part, divide(p, scale), &total)) return std::nullopt;
    return total;
  }
};

// Reads a number at the front of `s`. Returns false when there is none; sets *too_large when
// its whole part does not fit 64 bits.
bool read_decimal(std::string_view& s, Decimal* out, bool* too_large) {
  std::size_t i = 0;
  bool digits = false;
  while (i < s.size() && is_digit(s[i])) {
    if (__builtin_mul_overflow(out->whole, 10u, &out->whole) ||
        __builtin_add_overflow(out->whole, static_cast<unsigned>(s[i] - '0'), &out->whole))
      *too_large = true;
    if (*too_large) out->whole = 0;  // keep scanning, the caller reports
    digits = true;
    ++i;
  }
  if (i < s.size() && s[i] == '.') {
    ++i;
    int n = 0;
    while (i < s.size() && is_digit(s[i])) {
      // Digits beyond 18 cannot change a millisecond or a byte; they are read and ignored.
      if (n < kMaxFractionDigits) {
        out->fraction = out->fraction * 10 + static_cast<unsigned>(s[i] - '0');
        out->scale *= 10;
        ++n;
      }
      digits = true;
      ++i;
    }
  }
  s.remove_prefix(i);
  return digits;
}

std::string_view read_unit(std::string_view& s) {
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
  std::size_t i = 0;
  while (i < s.size() && is_alpha(s[i])) ++i;
  const auto unit = s.substr(0, i);
  s.remove_prefix(i);
  return unit;
}

struct Unit {
  std::string_view name;
  std::uint64_t factor;
};

constexpr std::array<Unit, 5> kDurationUnits{{
    {"d", 86400000},
    {"h", 3600000},
    {"m", 60000},
    {"s", 1000},
    {"ms", 1},
}};

// IEC binary units are what people mean for buffers; SI decimal units are accepted with their
// standard meaning (powers of 1000) because that is what the letters say. Bare K/M/G are
// refused as ambiguous rather than guessed.
constexpr std::array<Unit, 11> kSizeUnits{{
    {"B", 1},
    {"KiB", 1ull << 10},
    {"MiB", 1ull << 20},
    {"GiB", 1ull << 30},
    {"TiB", 1ull << 40},
    {"kB", 1000},
    {"KB", 1000},
    {"MB", 1000 * 1000},
    {"GB", 1000 * 1000 * 1000},
    {"TB", 1000ull * 1000 * 1000 * 1000},
    {"bytes", 1},
}};

template <std::size_t N>
const Unit* find_unit(const std::array<Unit, N>& units, std::string_view name) {
  for (const auto& u : units)
    if (u.name == name) return &u;
  return nullptr;
}

}  // namespace

std::optional<Millis> parse_duration(std::string_view text, std::string* error) {
  const std::string_view all = trim(text);
  if (all.empty()) {
    set_error(error, "a duration must not be empty; write e.g. 30s, 250ms, 5m or 1h");
    return std::nullopt;
  }
  if (all.front() == '-') {
    set_error(error, "a duration cannot be negative, got " + shown(all));
    return std::nullopt;
  }
  std::string_view rest = all;
  std::uint64_t total = 0;
  std::uint64_t previous_unit = 0;
  bool first = true;
  bool too_large = false;
  while (!rest.empty()) {
    Decimal number;
    if (!read_decimal(rest, &number, &too_large)) {
      set_error(error, shown(all) +
                           " is not a duration; write a number with a unit ms, s, m, h or d "
                           "(e.g. 250ms, 10s, 5m), or a number of seconds");
      return std::nullopt;
    }
    const std::string_view unit_name = read_unit(rest);
    std::uint64_t factor = 0;
    if (unit_name.empty()) {
      if (!first || !rest.empty()) {
        set_error(error, shown(all) + " is not a duration: a number has no unit");
        return std::nullopt;
      }
      factor = 1000;  // a bare number is seconds (docs/interface.md)
    } else if (const Unit* u = find_unit(kDurationUnits, unit_name)) {
      factor = u->factor;
    } else {
      set_error(error, "unknown duration unit " + shown(unit_name) + " in " + shown(all) +
                           "; use ms, s, m, h or d");
      return std::nullopt;
    }
    // "1h30m" reads naturally; "30m1h" or "1m1m" is almost certainly a slip.
    if (!first && factor >= previous_unit) {
      set_error(error, shown(all) +
                           " is not a duration: in a combined duration the units must go from "
                           "largest to smallest, each once (e.g. 1h30m)");
      return std::nullopt;
    }
    previous_unit = factor;
    first = false;
    if (!too_large) {
      const auto part = number.times(factor);
      too_large = !part || __builtin_add_overflow(total, *part, &total);
    }
    if (too_large || total > static_cast<std::uint64_t>(kMaxDurationMs)) {
      set_error(error, shown(all) + " is too long; the longest duration is 36500d (100 years)");
      return std::nullopt;
    }
  }
  return Millis(static_cast<std::int64_t>(total));
}

std::optional<std::uint64_t> parse_size(std::string_view text, std::string* error) {
  const std::string_view all = trim(text);
  if (all.empty()) {
    set_error(error, "a size must not be empty; write e.g. 512KiB, 64MiB or a number of bytes");
    return std::nullopt;
  }
  if (all.front() == '-') {
    set_error(error, "a size cannot be negative, got " + shown(all));
    return std::nullopt;
  }
  std::string_view rest = all;
  Decimal number;
  bool too_large = false;
  if (!read_decimal(rest, &number, &too_large)) {
    set_error(error, shown(all) +
                         " is not a size; write a number with a unit B, KiB, MiB, GiB or TiB "
                         "(e.g. 512KiB, 64MiB), or a number of bytes");
    return std::nullopt;
  }
  const std::string_view unit_name = read_unit(rest);
  if (!rest.empty()) {
    set_error(error, shown(all) + " is not a size; write one number and one unit (e.g. 64MiB)");
    return std::nullopt;
  }
  std::uint64_t factor = 1;
  if (!unit_name.empty()) {
    const Unit* u = find_unit(kSizeUnits, unit_name);
    if (!u) {
      const bool ambiguous = unit_name == "K" || unit_name == "k" || unit_name == "M" ||
                             unit_name == "G" || unit_name == "T";
      set_error(error, ambiguous
                           ? "size unit " + shown(unit_name) + " in " + shown(all) +
                                 " is ambiguous; write " + std::string(unit_name) +
                                 "iB (powers of 1024) or " + std::string(unit_name) +
                                 "B (powers of 1000)"
                           : "unknown size unit " + shown(unit_name) + " in " + shown(all) +
                                 "; use B, KiB, MiB, GiB, TiB (or kB, MB, GB, TB for powers of "
                                 "1000)");
      return std::nullopt;
    }
    factor = u->factor;
  }
  if (factor == 1 && number.has_fraction()) {
    set_error(error, shown(all) + " is not a whole number of bytes");
    return std::nullopt;
  }
  const auto bytes = too_large ? std::nullopt : number.times(factor);
  if (!bytes) {
    set_error(error, shown(all) + " is too large");
    return std::nullopt;
  }
  return *bytes;
}

std::string format_duration(Millis d) {
  std::int64_t ms = d.count();
  if (ms == 0) return "0s";
  std::string out;
  std::uint64_t left;
  if (ms < 0) {
    out = "-";
    left = static_cast<std::uint64_t>(-(ms + 1)) + 1;  // safe for INT64_MIN
  } else {
    left = static_cast<std::uint64_t>(ms);
  }
  for (const auto& u : kDurationUnits) {
    const std::uint64_t n = left / u.factor;
    if (n == 0) continue;
    out += std::to_string(n);
    out += u.name;
    left -= n * u.factor;
  }
  return out;
}

std::string format_size(std::uint64_t bytes) {
  if (bytes < 1024) return std::to_string(bytes) + " B";
  static constexpr std::array<const char*, 6> kNames{"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  double value = static_cast<double>(bytes) / 1024.0;
  std::size_t i = 0;
  // Move up while the value would print as 1024.0 or more ("1024.0 KiB" reads worse than
  // "1.0 MiB").
  while (i + 1 < kNames.size() && value >= 1023.95) {
    value /= 1024.0;
    ++i;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f %s", value, kNames[i]);
  return buf;
}

}  // namespace tb
