// Server-side RPC as JSON (docs/thingsboard-coap.md §3.1; docs/attributes.md). Pure functions.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace tb::rpc {

inline constexpr std::size_t kMaxRequest = 16 * 1024;
inline constexpr int kMaxDepth = 8;
inline constexpr std::size_t kMaxMethod = 128;

struct Request {
  std::int64_t id = 0;
  std::string method;
  nlohmann::json params;  // null when absent
};

// {"id":N|"N","method":"…","params":…}: id a non-negative integer, as a number or a numeric
// string (§3.1: the code sends a number, the docs show a string). nullopt and *error otherwise.
std::optional<Request> parse_request(std::string_view payload, std::string* error);

// The identity used to recognise a request ThingsBoard sends again (docs/attributes.md
// "De-duplication"): id, method and params.
std::string request_key(const Request& r);

// Replies are always JSON objects (§3.1, recommendation 4).
std::string error_reply(const std::string& message);

}  // namespace tb::rpc
