#include "telemetry/record.hpp"

#include <charconv>
#include <cmath>
#include <cstring>

namespace tb::telemetry {

namespace {

constexpr char kHex[] = "0123456789abcdef";
constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

// Length of the valid UTF-8 sequence at s[i], or 0 if it is not one (RFC 3629 table 3: no
// overlongs, no surrogates, nothing above U+10FFFF).
std::size_t utf8_sequence(std::string_view s, std::size_t i) {
  const auto b = [&](std::size_t k) { return static_cast<unsigned char>(s[i + k]); };
  const auto cont = [&](std::size_t k) { return i + k < s.size() && (b(k) & 0xC0) == 0x80; };
  const unsigned char c = b(0);
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) return cont(1) ? 2 : 0;
  if (c >= 0xE0 && c <= 0xEF) {
    if (!cont(1) || !cont(2)) return 0;
    if (c == 0xE0 && b(1) < 0xA0) return 0;  // overlong
    if (c == 0xED && b(1) > 0x9F) return 0;  // UTF-16 surrogate
    return 3;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    if (!cont(1) || !cont(2) || !cont(3)) return 0;
    if (c == 0xF0 && b(1) < 0x90) return 0;  // overlong
    if (c == 0xF4 && b(1) > 0x8F) return 0;  // above U+10FFFF
    return 4;
  }
  return 0;
}

// JSON string body (RFC 8259 §7). Invalid UTF-8 becomes U+FFFD: a source reading a binary file
// must not make the whole batch unparsable for the server (which would answer 4.00 and cost
// the other readings in it).
void append_escaped(std::string& out, std::string_view s) {
  out += '"';
  std::size_t i = 0;
  while (i < s.size()) {
    // Fast path: copy runs of plain ASCII in one go.
    std::size_t j = i;
    while (j < s.size()) {
      const auto c = static_cast<unsigned char>(s[j]);
      if (c < 0x20 || c == '"' || c == '\\' || c >= 0x80) break;
      ++j;
    }
    out.append(s.data() + i, j - i);
    i = j;
    if (i == s.size()) break;
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x80) {
      const std::size_t n = utf8_sequence(s, i);
      if (n == 0) {
        out += kReplacement;
        ++i;
      } else {
        out.append(s.data() + i, n);
        i += n;
      }
      continue;
    }
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        out += "\\u00";
        out += kHex[c >> 4];
        out += kHex[c & 0xF];
    }
    ++i;
  }
  out += '"';
}

void append_int(std::string& out, std::int64_t v) {
  char buf[24];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);
  out.append(buf, r.ptr);
}

void append_double(std::string& out, double v) {
  char buf[40];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);  // shortest that round-trips
  out.append(buf, r.ptr);
  // 21.0 would print as "21", which ThingsBoard stores as a long (docs/thingsboard-coap.md §1,
  // "Value typing"): keep the key's type stable by always writing a fraction or an exponent.
  if (std::memchr(buf, '.', r.ptr - buf) == nullptr &&
      std::memchr(buf, 'e', r.ptr - buf) == nullptr)
    out += ".0";
}

void append_value(std::string& out, const Value& value) {
  switch (value.index()) {
    case 0:
      out += std::get<bool>(value) ? "true" : "false";
      break;
    case 1:
      append_int(out, std::get<std::int64_t>(value));
      break;
    case 2:
      append_double(out, std::get<double>(value));
      break;
    default:
      append_escaped(out, std::get<std::string>(value));
      break;
  }
}

std::size_t digits(std::int64_t v) {
  char buf[24];
  return static_cast<std::size_t>(std::to_chars(buf, buf + sizeof buf, v).ptr - buf);
}

constexpr std::string_view kTsOpen = "{\"ts\":";
constexpr std::string_view kValues = ",\"values\":";

}  // namespace

bool is_encodable(const Value& value) {
  if (const double* d = std::get_if<double>(&value)) return std::isfinite(*d);
  return true;
}

std::string encode_values(const std::vector<Reading>& readings) {
  return encode_values(readings, nullptr);
}

std::string encode_values(const std::vector<Reading>& readings, std::size_t* encoded) {
  std::string out;
  out.reserve(2 + readings.size() * 16);
  out += '{';
  std::size_t n = 0;
  for (const Reading& r : readings) {
    if (!is_encodable(r.value)) continue;
    if (n++ > 0) out += ',';
    append_escaped(out, r.key);
    out += ':';
    append_value(out, r.value);
  }
  out += '}';
  if (encoded) *encoded = n;
  return out;
}

void append_record(std::string& out, std::int64_t ts_ms, std::string_view values_json) {
  out += kTsOpen;
  append_int(out, ts_ms);
  out += kValues;
  out += values_json;
  out += '}';
}

std::size_t record_size(std::int64_t ts_ms, std::size_t values_json_size) {
  return kTsOpen.size() + digits(ts_ms) + kValues.size() + values_json_size + 1;
}

std::string encode_record(const Record& record) {
  std::string out;
  append_record(out, record.ts_ms, encode_values(record.readings));
  return out;
}

std::string encode_records(const std::vector<Record>& records) {
  std::string out = "[";
  for (std::size_t i = 0; i < records.size(); ++i) {
    if (i > 0) out += ',';
    append_record(out, records[i].ts_ms, encode_values(records[i].readings));
  }
  out += ']';
  return out;
}

namespace {

// A JSON string at s[i] ('"' … '"'), escapes skipped over; returns the index after it, or npos.
std::size_t skip_string(std::string_view s, std::size_t i) {
  if (i >= s.size() || s[i] != '"') return std::string_view::npos;
  for (++i; i < s.size(); ++i) {
    if (s[i] == '\\') {
      ++i;
    } else if (s[i] == '"') {
      return i + 1;
    }
  }
  return std::string_view::npos;
}

std::uint64_t fnv1a(std::string_view bytes, std::uint64_t h = 14695981039346656037ull) {
  for (const unsigned char c : bytes) h = (h ^ c) * 1099511628211ull;
  return h;
}

}  // namespace

// Reads only what append_record writes: [{"ts":N,"values":{"k":v,...}},...] with flat values
// (numbers, booleans, strings). A key is hashed in its encoded form, which encode_values makes
// the same for the same key every time.
std::optional<std::vector<std::uint64_t>> point_hashes(std::string_view b) {
  std::vector<std::uint64_t> out;
  std::size_t i = 0;
  if (b.empty() || b[i++] != '[') return std::nullopt;
  if (i < b.size() && b[i] == ']') return i + 1 == b.size() ? std::optional(out) : std::nullopt;
  while (true) {
    if (b.substr(i, kTsOpen.size()) != kTsOpen) return std::nullopt;
    i += kTsOpen.size();
    std::int64_t ts = 0;
    const auto [end, ec] = std::from_chars(b.data() + i, b.data() + b.size(), ts);
    if (ec != std::errc()) return std::nullopt;
    i = static_cast<std::size_t>(end - b.data());
    if (b.substr(i, kValues.size()) != kValues) return std::nullopt;
    i += kValues.size();
    if (i >= b.size() || b[i++] != '{') return std::nullopt;
    char ts_bytes[sizeof ts];
    std::memcpy(ts_bytes, &ts, sizeof ts);
    const std::uint64_t seed = fnv1a(std::string_view(ts_bytes, sizeof ts_bytes));
    while (i < b.size() && b[i] != '}') {
      const std::size_t key_end = skip_string(b, i);
      if (key_end == std::string_view::npos || key_end >= b.size() || b[key_end] != ':')
        return std::nullopt;
      out.push_back(fnv1a(b.substr(i, key_end - i), seed));
      i = key_end + 1;
      if (i < b.size() && b[i] == '"') {
        i = skip_string(b, i);
        if (i == std::string_view::npos) return std::nullopt;
      } else {
        while (i < b.size() && b[i] != ',' && b[i] != '}') ++i;
      }
      if (i < b.size() && b[i] == ',') ++i;
    }
    if (i + 1 >= b.size() || b[i] != '}' || b[i + 1] != '}') return std::nullopt;
    i += 2;
    if (i < b.size() && b[i] == ',') {
      ++i;
      continue;
    }
    if (i + 1 == b.size() && b[i] == ']') return out;
    return std::nullopt;
  }
}

}  // namespace tb::telemetry
