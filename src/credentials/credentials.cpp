#include "credentials/credentials.hpp"

#include <sys/random.h>

#include <nlohmann/json.hpp>

#include "util/fs.hpp"

namespace tb::credentials {

namespace {

using nlohmann::json;

std::optional<json> load_json(const std::filesystem::path& file, std::string* error) {
  std::string err;
  auto text = read_file(file, &err);
  if (!text) {
    if (error) *error = err;
    return std::nullopt;
  }
  json j = json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) {
    if (error) *error = file.string() + " is not a JSON object";
    return std::nullopt;
  }
  return j;
}

std::string string_field(const json& j, const char* name) {
  auto it = j.find(name);
  return (it != j.end() && it->is_string()) ? it->get<std::string>() : std::string();
}

}  // namespace

std::optional<Credentials> load(const std::filesystem::path& state_dir, std::string* error) {
  if (error) error->clear();
  const auto file = state_dir / kCredentialsFile;
  auto j = load_json(file, error);
  if (!j) return std::nullopt;
  Credentials c;
  c.type = string_field(*j, "credentialsType");
  c.value = string_field(*j, "credentialsValue");
  c.device_name = string_field(*j, "deviceName");
  if (c.type != "ACCESS_TOKEN") {
    if (error)
      *error =
          file.string() + ": credentialsType '" + c.type + "' is not supported (only ACCESS_TOKEN)";
    return std::nullopt;
  }
  if (c.value.empty()) {
    if (error) *error = file.string() + ": credentialsValue is missing or empty";
    return std::nullopt;
  }
  return c;
}

bool save(const std::filesystem::path& state_dir, const Credentials& creds, std::string* error) {
  json j = {{"credentialsType", creds.type},
            {"credentialsValue", creds.value},
            {"deviceName", creds.device_name}};
  return write_file_atomic(state_dir / kCredentialsFile, j.dump(2) + "\n", 0600, error);
}

std::optional<PendingProvision> load_pending(const std::filesystem::path& state_dir,
                                             std::string* error) {
  if (error) error->clear();
  auto j = load_json(state_dir / kPendingFile, error);
  if (!j) return std::nullopt;
  PendingProvision p;
  p.device_name = string_field(*j, "deviceName");
  p.token = string_field(*j, "token");
  p.attempts = j->value("attempts", 0u);
  p.first_attempt_ms = j->value("firstAttemptMs", std::int64_t{0});
  if (p.token.empty()) {
    if (error) *error = (state_dir / kPendingFile).string() + ": token is missing";
    return std::nullopt;
  }
  return p;
}

bool save_pending(const std::filesystem::path& state_dir, const PendingProvision& pending,
                  std::string* error) {
  json j = {{"deviceName", pending.device_name},
            {"token", pending.token},
            {"attempts", pending.attempts},
            {"firstAttemptMs", pending.first_attempt_ms}};
  return write_file_atomic(state_dir / kPendingFile, j.dump(2) + "\n", 0600, error);
}

void remove_pending(const std::filesystem::path& state_dir) {
  std::error_code ec;
  std::filesystem::remove(state_dir / kPendingFile, ec);
}

std::string generate_token() {
  static constexpr char kAlphabet[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
  constexpr std::size_t kLen = 20;
  std::string out;
  out.reserve(kLen);
  while (out.size() < kLen) {
    unsigned char buf[32];
    ssize_t n = getrandom(buf, sizeof buf, 0);
    if (n <= 0) continue;  // EINTR; getrandom never fails otherwise once the pool is ready
    for (ssize_t i = 0; i < n && out.size() < kLen; ++i) {
      // 62 letters: reject 248..255 so every letter is equally likely.
      if (buf[i] < 248) out.push_back(kAlphabet[buf[i] % 62]);
    }
  }
  return out;
}

}  // namespace tb::credentials
