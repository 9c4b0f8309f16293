// Pure emulation of ThingsBoard's payload rules (docs/thingsboard-coap.md §0, §1, §2, §4).
// Nothing here throws: every parse uses nlohmann's non-throwing entry points, so these can be
// called from the datagram path without any risk of an exception escaping.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace tbserver {

using nlohmann::json;

enum class Feature { kNone, kTelemetry, kAttributes, kRpc, kClaim, kProvision, kUnknown };
const char* FeatureName(Feature f);

// §0 "Path parsing under /api/v1": segments include "api" and "v1".
struct ApiPath {
  Feature feature = Feature::kNone;
  std::optional<std::string> token;       // only from 4+ segments
  std::optional<std::string> request_id;  // rpc id (4-seg X.509 form or 5+ segments)
};
ApiPath ParseApiPath(const std::vector<std::string>& segments);

// §1: result of converting a telemetry body.
struct Point {
  std::string key;
  int64_t ts = 0;
  json value;
};
struct ParseResult {
  uint8_t code = 0;  // 0 = ok, else the CoAP error code (4.00 / 5.00)
  std::vector<Point> points;
  json attributes = json::object();  // for attribute POST
};

ParseResult ParseTelemetry(const std::string& payload, int64_t server_ms);
ParseResult ParseAttributes(const std::string& payload);

// §1 "Value typing": booleans stay, numbers -> long/double, numeric strings cast, null skipped.
std::optional<json> TypedValue(const json& v);

std::string RandomAlnum(size_t n);

}  // namespace tbserver
