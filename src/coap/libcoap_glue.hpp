// Internal to coap/: what Client and Observer share around libcoap (defined in client.cpp).
// libcoap's log handler is process-wide, so there is one handler and one masker of the secret
// path segments (access tokens) every Client and Observer has used.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <vector>

namespace tb::coap::detail {

// coap_startup() and the log handler, once per process; then follows spdlog's level.
void setup_libcoap_once();
// Follows spdlog: libcoap's PDU dumps only when we are debugging.
void sync_log_level();
// A secret (reference counted) the log handler masks as "<redacted>".
void add_secret(const std::string& s);
void remove_secret(const std::string& s);
// Which path segment is a credential: api/v1/{token}/... and fw|sw/{token}.
std::optional<std::size_t> secret_segment(const std::vector<std::string>& path);
// The path with the credential segment shown as "<token>".
std::string path_for_log(const std::vector<std::string>& path);

}  // namespace tb::coap::detail
