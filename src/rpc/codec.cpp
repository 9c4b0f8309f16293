#include "rpc/codec.hpp"

#include <charconv>

#include "attributes/codec.hpp"

namespace tb::rpc {

using nlohmann::json;

std::optional<Request> parse_request(std::string_view payload, std::string* error) {
  if (payload.size() > kMaxRequest) {
    *error = std::to_string(payload.size()) + "-byte request, over the limit";
    return std::nullopt;
  }
  if (attributes::nesting_depth(payload) > kMaxDepth) {
    *error = "request nested deeper than " + std::to_string(kMaxDepth) + " levels";
    return std::nullopt;
  }
  json j = json::parse(payload, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    *error = "request is not a JSON object";
    return std::nullopt;
  }
  Request r;
  const json& id = j.contains("id") ? j["id"] : json();
  if (id.is_number_unsigned() || (id.is_number_integer() && id.get<std::int64_t>() >= 0)) {
    r.id = id.get<std::int64_t>();
  } else if (id.is_string()) {
    const std::string s = id.get<std::string>();
    const auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), r.id);
    if (s.empty() || ec != std::errc() || p != s.data() + s.size() || r.id < 0) {
      *error = "request id is not a number";
      return std::nullopt;
    }
  } else {
    *error = "request without a numeric id";
    return std::nullopt;
  }
  if (!j.contains("method") || !j["method"].is_string() || j["method"].get<std::string>().empty() ||
      j["method"].get<std::string>().size() > kMaxMethod) {
    *error = "request without a method name";
    return std::nullopt;
  }
  r.method = j["method"].get<std::string>();
  if (j.contains("params")) r.params = j["params"];
  return r;
}

std::string request_key(const Request& r) {
  return std::to_string(r.id) + '\n' + r.method + '\n' + r.params.dump();
}

std::string error_reply(const std::string& message) { return json{{"error", message}}.dump(); }

}  // namespace tb::rpc
