#include "tb_rules.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <random>

namespace tbserver {

namespace {
constexpr uint8_t kBadRequest = (4 << 5) | 0;
constexpr uint8_t kInternal = (5 << 5) | 0;

std::string Lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

Feature FeatureOf(const std::string& s) {
  // §0: feature names are case-insensitive.
  std::string l = Lower(s);
  if (l == "telemetry") return Feature::kTelemetry;
  if (l == "attributes") return Feature::kAttributes;
  if (l == "rpc") return Feature::kRpc;
  if (l == "claim") return Feature::kClaim;
  if (l == "provision") return Feature::kProvision;
  return Feature::kUnknown;
}

bool AllDigits(const std::string& s) {
  return !s.empty() &&
         std::all_of(s.begin(), s.end(), [](unsigned char c) { return std::isdigit(c); });
}

std::optional<int64_t> ParseLong(const std::string& s) {
  // Java Long.parseLong: optional sign, digits only.
  int64_t v = 0;
  const char* b = s.data();
  const char* e = s.data() + s.size();
  if (b != e && *b == '+') ++b;
  auto [p, ec] = std::from_chars(b, e, v);
  if (ec != std::errc() || p != e || b == e) return std::nullopt;
  return v;
}

// §1 "Strings: with type-cast on, a string that parses as a number is stored as a number".
std::optional<json> CastNumericString(const std::string& s) {
  if (auto l = ParseLong(s)) return json(*l);
  if (s.empty()) return std::nullopt;
  // Decimal/exponent form (BigDecimal syntax): [+-]digits[.digits][e[+-]digits]
  size_t i = 0;
  if (s[i] == '+' || s[i] == '-') ++i;
  size_t digits = 0;
  while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) ++i, ++digits;
  if (i < s.size() && s[i] == '.') {
    ++i;
    while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) ++i, ++digits;
  }
  if (digits == 0) return std::nullopt;
  if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
    ++i;
    if (i < s.size() && (s[i] == '+' || s[i] == '-')) ++i;
    size_t ed = 0;
    while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) ++i, ++ed;
    if (ed == 0) return std::nullopt;
  }
  if (i != s.size()) return std::nullopt;
  double d = 0;
  auto [p, ec] = std::from_chars(s.data() + (s[0] == '+' ? 1 : 0), s.data() + s.size(), d);
  if (ec != std::errc()) return std::nullopt;
  (void)p;
  return json(d);
}

// Adds the key/value pairs of a flat object, skipping nulls.
void AddFlat(const json& obj, int64_t ts, std::vector<Point>& out) {
  for (auto it = obj.begin(); it != obj.end(); ++it) {
    if (auto v = TypedValue(it.value())) out.push_back({it.key(), ts, std::move(*v)});
  }
}

// One element of the telemetry body: flat object or {ts, values}. Returns error code or 0.
uint8_t AddTelemetryObject(const json& obj, int64_t server_ms, std::vector<Point>& out) {
  if (obj.contains("ts") && obj.contains("values")) {
    const json& ts = obj["ts"];
    const json& values = obj["values"];
    // §1: `ts` read as a 64-bit integer, number or numeric string. Anything else escapes the
    // adaptor's catch and ends as 5.00 [inferred]; checked before `values` like getAsLong().
    int64_t t = 0;
    if (ts.is_number_integer()) {
      t = ts.get<int64_t>();
    } else if (ts.is_number_float()) {
      t = static_cast<int64_t>(ts.get<double>());
    } else if (ts.is_string()) {
      auto l = ParseLong(ts.get<std::string>());
      if (!l) return kInternal;
      t = *l;
    } else {
      return kInternal;
    }
    if (!values.is_object()) return kBadRequest;  // §1 "`values` is not an object" -> 4.00
    AddFlat(values, t, out);
    return 0;
  }
  AddFlat(obj, server_ms, out);
  return 0;
}
}  // namespace

const char* FeatureName(Feature f) {
  switch (f) {
    case Feature::kTelemetry:
      return "telemetry";
    case Feature::kAttributes:
      return "attributes";
    case Feature::kRpc:
      return "rpc";
    case Feature::kClaim:
      return "claim";
    case Feature::kProvision:
      return "provision";
    case Feature::kUnknown:
      return "unknown";
    case Feature::kNone:
      break;
  }
  return "";
}

ApiPath ParseApiPath(const std::vector<std::string>& seg) {
  ApiPath p;
  const size_t n = seg.size();
  if (n == 3) {
    p.feature = FeatureOf(seg[2]);  // "provision" or the X.509 token-less form
  } else if (n == 4) {
    if (AllDigits(seg[3])) {
      p.feature = FeatureOf(seg[2]);  // X.509 RPC-reply form
      p.request_id = seg[3];
    } else {
      p.token = seg[2];
      p.feature = FeatureOf(seg[3]);
    }
  } else if (n >= 5) {
    p.token = seg[2];
    p.feature = FeatureOf(seg[3]);
    p.request_id = seg[4];
  }
  return p;
}

std::optional<json> TypedValue(const json& v) {
  if (v.is_null()) return std::nullopt;
  if (v.is_string()) {
    if (auto n = CastNumericString(v.get<std::string>())) return n;
    return v;
  }
  if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) {
    return json(v.dump());  // does not fit a long -> stored as string (type-cast on)
  }
  return v;  // bool, long, double, nested JSON
}

ParseResult ParseTelemetry(const std::string& payload, int64_t server_ms) {
  ParseResult r;
  json j = json::parse(payload, nullptr, /*allow_exceptions=*/false);
  if (payload.empty() || j.is_discarded()) {
    r.code = kBadRequest;  // §1: empty payload / malformed JSON -> 4.00
    return r;
  }
  if (j.is_object()) {
    r.code = AddTelemetryObject(j, server_ms, r.points);
  } else if (j.is_array()) {
    for (const auto& e : j) {
      if (!e.is_object()) {
        r.code = kBadRequest;  // §1: array element that is not an object -> 4.00
        break;
      }
      r.code = AddTelemetryObject(e, server_ms, r.points);
      if (r.code) break;
    }
  } else {
    r.code = kBadRequest;  // §1: top level not object/array -> 4.00
  }
  if (r.code) r.points.clear();
  return r;
}

ParseResult ParseAttributes(const std::string& payload) {
  ParseResult r;
  json j = json::parse(payload, nullptr, false);
  if (payload.empty() || j.is_discarded() || !j.is_object()) {
    r.code = kBadRequest;  // §2.1: body must be a JSON object; arrays get 4.00
    return r;
  }
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (auto v = TypedValue(it.value())) r.attributes[it.key()] = *v;
  }
  return r;
}

std::string RandomAlnum(size_t n) {
  static const char kChars[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
  static std::mt19937_64 rng{std::random_device{}()};
  std::uniform_int_distribution<size_t> d(0, sizeof(kChars) - 2);
  std::string s;
  for (size_t i = 0; i < n; ++i) s.push_back(kChars[d(rng)]);
  return s;
}

}  // namespace tbserver
