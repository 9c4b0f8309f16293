// The device's credentials in <state_dir>/credentials.json (docs/interface.md, "Files"), and the
// pending-provisioning record that makes ThingsBoard's non-idempotent provisioning safe to retry.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace tb::credentials {

inline constexpr const char* kCredentialsFile = "credentials.json";
inline constexpr const char* kPendingFile = "provisioning.json";

// credentialsType as ThingsBoard names it (docs/thingsboard-coap.md §4.1).
inline constexpr std::string_view kAccessToken = "ACCESS_TOKEN";
inline constexpr std::string_view kX509Certificate = "X509_CERTIFICATE";

struct Credentials {
  std::string type = std::string(kAccessToken);
  // credentialsValue: the access token; with X509_CERTIFICATE the certificate's PEM as the
  // server answered it (informational: the certificate in use is server.dtls.cert_file), or empty.
  std::string value;
  std::string device_name;
  bool x509() const { return type == kX509Certificate; }
  // What goes into request paths: the token, or nothing with X.509.
  std::string path_token() const { return x509() ? std::string() : value; }
};

// The one builder of ThingsBoard's device API paths (docs/thingsboard-coap.md §0, "Path parsing"):
// api/v1/{token}/{feature}[/{id}] with a token, api/v1/{feature}[/{id}] with an empty token (the
// X.509 form: the device is the one of the DTLS handshake's client certificate).
std::vector<std::string> api_path(const std::string& token, std::string_view feature,
                                  const std::string& id = {});

// What we proposed in a provision request, saved before the request is sent: an access token, or
// (x509) our certificate. If the answer is lost and a retry answers FAILURE, the device may well
// exist with it (docs/thingsboard-coap.md §4.3, "No idempotency"); the agent then checks it.
struct PendingProvision {
  std::string device_name;
  std::string token;           // empty when x509
  std::uint32_t attempts = 0;  // requests sent so far
  std::int64_t first_attempt_ms = 0;
  bool x509 = false;  // X509_CERTIFICATE with our certificate was proposed, not a token
};

// nullopt with *error empty: no file. nullopt with *error set: unreadable or invalid.
std::optional<Credentials> load(const std::filesystem::path& state_dir, std::string* error);
// Atomic (temp file, fsync, rename), mode 0600.
bool save(const std::filesystem::path& state_dir, const Credentials& creds, std::string* error);

// nullopt with *error empty: no record; with *error set: unreadable (no token), to be ignored.
// A record with its token but an unreadable count comes back with *error set as a warning:
// attempts is then 1 (a request may have been sent), so a FAILURE still checks the token.
std::optional<PendingProvision> load_pending(const std::filesystem::path& state_dir,
                                             std::string* error);
bool save_pending(const std::filesystem::path& state_dir, const PendingProvision& pending,
                  std::string* error);
void remove_pending(const std::filesystem::path& state_dir);

// A fresh random access token: 20 characters of [A-Za-z0-9] from getrandom(2) (ThingsBoard's own
// generated tokens are 20 alphanumerics).
std::string generate_token();

}  // namespace tb::credentials
