// Internal to coap/: what Client and Observer share around libcoap (defined in client.cpp).
// libcoap's log handler is process-wide, so there is one handler and one masker of the secret
// path segments (access tokens) every Client and Observer has used.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <vector>

#include "coap/client.hpp"
#include "coap/libcoap.hpp"

namespace tb::coap::detail {

// Loads the libcoap build the transport needs (the DTLS one with `dtls`) and sets it up once.
bool prepare_libcoap(const std::optional<DtlsOptions>& dtls, std::string* error);
// The trusted CAs of every DTLS session of `ctx`.
bool trust_cas(coap_context_t* ctx, const DtlsOptions& d, std::string* error);
// The PKI setup of a DTLS session: the chain verified, the server's name checked. `d` must outlive
// the session's creation (libcoap copies the strings then).
coap_dtls_pki_t dtls_pki(const DtlsOptions& d);
// Before a new DTLS session: forget the reason of the last failed handshake.
void reset_tls_problem();
// "DTLS handshake with HOST:PORT failed: <the reason libcoap's OpenSSL layer gave>".
std::string tls_failure(const std::string& remote);

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
