#include "credentials/credentials.hpp"

#include <sys/random.h>

#include <nlohmann/json.hpp>

#include <limits>

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

// dump() throws type_error.316 on a string that is not UTF-8; a device name from an older
// version's config could be one. Such bytes are written as U+FFFD instead.
std::string dump(const json& j) {
  return j.dump(2, ' ', false, json::error_handler_t::replace) + "\n";
}

// A number field of the record, or nullopt when it is absent, not a number or out of range —
// never an exception (j.value() throws type_error.302 on `null` or "3").
template <class T>
std::optional<T> number_field(const json& j, const char* name) {
  auto it = j.find(name);
  if (it == j.end() || !it->is_number_integer()) return std::nullopt;
  if (it->is_number_unsigned()) {
    const auto v = it->get<std::uint64_t>();
    if (v > static_cast<std::uint64_t>(std::numeric_limits<T>::max())) return std::nullopt;
    return static_cast<T>(v);
  }
  const auto v = it->get<std::int64_t>();
  if (v < static_cast<std::int64_t>(std::numeric_limits<T>::min()) ||
      (v > 0 &&
       static_cast<std::uint64_t>(v) > static_cast<std::uint64_t>(std::numeric_limits<T>::max())))
    return std::nullopt;
  return static_cast<T>(v);
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
  for (const char* name : {"credentialsType", "credentialsValue"}) {
    if (auto it = j->find(name); it == j->end() || !it->is_string()) {
      if (error) *error = file.string() + ": " + name + " is missing or not a string";
      return std::nullopt;
    }
  }
  if (c.type != kAccessToken && c.type != kX509Certificate) {
    if (error)
      *error = file.string() + ": credentialsType '" + c.type +
               "' is not supported (only ACCESS_TOKEN and X509_CERTIFICATE)";
    return std::nullopt;
  }
  // X.509: the certificate in use is server.dtls.cert_file; the value is only kept.
  if (c.value.empty() && !c.x509()) {
    if (error) *error = file.string() + ": credentialsValue is missing or empty";
    return std::nullopt;
  }
  return c;
}

bool save(const std::filesystem::path& state_dir, const Credentials& creds, std::string* error) {
  json j = {{"credentialsType", creds.type},
            {"credentialsValue", creds.value},
            {"deviceName", creds.device_name}};
  return write_file_atomic(state_dir / kCredentialsFile, dump(j), 0600, error);
}

std::optional<PendingProvision> load_pending(const std::filesystem::path& state_dir,
                                             std::string* error) {
  if (error) error->clear();
  auto j = load_json(state_dir / kPendingFile, error);
  if (!j) return std::nullopt;
  const std::string file = (state_dir / kPendingFile).string();
  PendingProvision p;
  p.device_name = string_field(*j, "deviceName");
  p.token = string_field(*j, "token");
  p.x509 = string_field(*j, "credentialsType") == kX509Certificate;
  if (p.token.empty() && !p.x509) {
    if (error) *error = file + ": token is missing or not a string";
    return std::nullopt;
  }
  // The token is what matters: it may be registered already. An unreadable count must not make
  // a FAILURE look final (that needs attempts > 1 to check the token), so it counts as one
  // request sent: the next is the second, and a FAILURE to it checks the token.
  const auto attempts = number_field<std::uint32_t>(*j, "attempts");
  const auto first = number_field<std::int64_t>(*j, "firstAttemptMs");
  p.attempts = attempts.value_or(1);
  p.first_attempt_ms = first.value_or(0);
  if (error && (!attempts || !first))
    *error = file + ": " + (!attempts ? "attempts" : "firstAttemptMs") +
             " is missing or not a whole number; keeping the proposed token" +
             (!attempts ? " and counting one request as sent" : "");
  return p;
}

bool save_pending(const std::filesystem::path& state_dir, const PendingProvision& pending,
                  std::string* error) {
  json j = {{"deviceName", pending.device_name},
            {"credentialsType", std::string(pending.x509 ? kX509Certificate : kAccessToken)},
            {"token", pending.token},
            {"attempts", pending.attempts},
            {"firstAttemptMs", pending.first_attempt_ms}};
  return write_file_atomic(state_dir / kPendingFile, dump(j), 0600, error);
}

void remove_pending(const std::filesystem::path& state_dir) {
  std::error_code ec;
  std::filesystem::remove(state_dir / kPendingFile, ec);
}

std::vector<std::string> api_path(const std::string& token, std::string_view feature,
                                  const std::string& id) {
  std::vector<std::string> path{"api", "v1"};
  if (!token.empty()) path.push_back(token);
  path.emplace_back(feature);
  if (!id.empty()) path.push_back(id);
  return path;
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
