// The device's credentials in <state_dir>/credentials.json (docs/interface.md, "Files"), and the
// pending-provisioning record that makes ThingsBoard's non-idempotent provisioning safe to retry.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

namespace tb::credentials {

inline constexpr const char* kCredentialsFile = "credentials.json";
inline constexpr const char* kPendingFile = "provisioning.json";

struct Credentials {
  std::string type = "ACCESS_TOKEN";  // credentialsType as ThingsBoard names it (§4.1)
  std::string value;                  // credentialsValue: the access token
  std::string device_name;
};

// The access token we proposed in a provision request, saved before the request is sent. If the
// answer is lost and a retry answers FAILURE, the device may well exist with this token
// (docs/thingsboard-coap.md §4.3, "No idempotency"); the agent then checks the token.
struct PendingProvision {
  std::string device_name;
  std::string token;
  std::uint32_t attempts = 0;  // requests sent so far
  std::int64_t first_attempt_ms = 0;
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
