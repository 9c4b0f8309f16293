// The configuration as the rest of the agent sees it: plain, immutable structs. Only config/
// knows YAML exists. Every problem in a file is reported at once with its position (Kea style),
// and a config with any problem is never half-applied.
//
// The member initializers below are the defaults: the loader leaves a field alone when its key
// is absent (docs/configuration.md documents the same values; config_test.cpp checks them).
// Sources are the exception: config/ knows none of their types; each type in src/sources/
// declares its own keys and defaults and reads them from a Value tree (SourceTypes below).
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "util/clock.hpp"

namespace tb::config {

using namespace std::chrono_literals;

struct Position {
  int line = 0;    // 1-based; 0 = unknown
  int column = 0;  // 1-based
};

// server.dtls: CoAP over DTLS 1.2 (coaps), the server's certificate verified; never a fallback to
// plain coap (docs/configuration.md, docs/security.md).
struct DtlsConfig {
  bool enabled = false;             // the section is present
  std::filesystem::path ca_file;    // trusted CAs (PEM); with ca_dir empty too: the system store
  std::filesystem::path ca_dir;     // or a directory of hashed CA certificates (c_rehash)
  std::string server_name;          // checked against the server's certificate; empty = host
  std::filesystem::path cert_file;  // X.509 client certificate (PEM), with key_file
  std::filesystem::path key_file;   // its private key (PEM), not readable by group or others
  // Not a key of the file: cert_file/key_file are the agent's own, generated into state_dir
  // before provisioning with X509_CERTIFICATE (docs/security.md, "The device's own key").
  bool generated_identity = false;
  bool operator==(const DtlsConfig&) const = default;
};

struct ServerConfig {
  std::string host;              // required
  std::uint16_t port = 5683;     // RFC 7252 §6.1 default coap port; 5684 (coaps) with dtls
  Millis request_timeout = 30s;  // docs/thingsboard-coap.md recommends 15–30 s
  // Largest answer body accepted (Block2 included); ThingsBoard's answers are a few KiB at most.
  std::uint64_t max_response_size = 16 << 10;
  DtlsConfig dtls;
  bool operator==(const ServerConfig&) const = default;
};

struct DeviceConfig {
  std::string name;  // default: the machine's hostname
};

// How the device proves who it is (docs/thingsboard-coap.md §0, "How the device is identified"):
// an access token in every request's path, or the X.509 client certificate of the DTLS
// handshake (server.dtls.cert_file) and token-less paths.
enum class CredentialsType { AccessToken, X509Certificate };

struct ProvisioningConfig {
  bool present = false;
  // The credentialsType asked for (§4.1): X509_CERTIFICATE proposes server.dtls.cert_file, or a
  // certificate the agent generates into state_dir when server.dtls has none.
  CredentialsType credentials_type = CredentialsType::AccessToken;
  Position credentials_type_at;
  std::string key;
  std::string secret;       // from `secret` or read from `secret_file` (e.g. LoadCredential=)
  std::string secret_file;  // where the secret came from, if a file
};

struct CredentialsConfig {
  std::string access_token;  // empty = none configured
  // X509Certificate: the device is pre-registered in ThingsBoard with server.dtls.cert_file.
  CredentialsType type = CredentialsType::AccessToken;
  Position type_at;
  // Credentials to use without provisioning: a token, or the configured certificate.
  bool configured() const {
    return !access_token.empty() || type == CredentialsType::X509Certificate;
  }
};

// A value from the YAML as the source types read it (yaml-cpp stays inside config/): the loader
// turns each item of `sources:` into a tree of these, and a plugin gets its `options:` as one.
// Plain scalars are typed as YAML 1.2's core schema does (true/false, null/~, integers, finite
// numbers); quoted scalars are strings. Maps keep the file's order (and, for the readers to
// report, repeated keys).
struct Value {
  struct Entry;  // one name: value of a map
  using List = std::vector<Value>;
  using Map = std::vector<Entry>;
  using Data = std::variant<std::monostate, bool, std::int64_t, double, std::string, List, Map>;
  Data data;
  // Where it is written, and a scalar's text as written (`007`, `1.50`, `yes`): a key that wants
  // a string or a duration reads this, not the typed value. Neither is part of ==.
  Position position;
  std::string text;

  Value() = default;
  Value(Data value);  // NOLINT(google-explicit-constructor): Value{2.5}, {std::string("x")}

  bool is_null() const { return data.index() == 0; }
  bool is_scalar() const { return data.index() >= 1 && data.index() <= 4; }
  const List* list() const { return std::get_if<List>(&data); }
  const Map* map() const { return std::get_if<Map>(&data); }

  // Defined below, once Entry is complete (clang 14 refuses a defaulted == here).
  bool operator==(const Value& other) const;
};

// Not std::pair: libstdc++'s pair needs a complete Value where clang 14 instantiates it.
struct Value::Entry {
  std::string first;  // the key
  Value second;
  Position key_position;  // not part of ==
  Entry() = default;
  Entry(std::string name, Value value) : first(std::move(name)), second(std::move(value)) {}
  bool operator==(const Entry& other) const {
    return first == other.first && second == other.second;
  }
};

inline Value::Value(Data value) : data(std::move(value)) {}

// The value only: a source that moved within the file compares equal.
inline bool Value::operator==(const Value& other) const { return data == other.data; }

// Bounds of an `options:` tree: a plugin's options are a few settings, not a data set.
inline constexpr int kMaxOptionDepth = 8;
inline constexpr std::size_t kMaxOptionNodes = 1000;
inline constexpr std::size_t kMaxOptionString = 4096;

// The settings of one source type, declared beside its code in src/sources/ (each type's table
// of keys builds them). Derive through SettingsOf, whose equals() is the type's defaulted ==.
struct SourceSettings {
  virtual ~SourceSettings() = default;
  virtual bool equals(const SourceSettings& other) const = 0;
  bool operator==(const SourceSettings&) const = default;  // no fields: for the types' ==
};

template <class Self>
struct SettingsOf : SourceSettings {
  bool operator==(const SettingsOf&) const = default;
  bool equals(const SourceSettings& other) const override {
    const auto* o = dynamic_cast<const Self*>(&other);
    return o != nullptr && static_cast<const Self&>(*this) == *o;
  }
};

// What every source has.
struct SourceCommon {
  std::string name;
  std::string type;       // as written in `type:`, a name in src/sources/registry.cpp
  Millis interval = 30s;  // 0 for a type without one (execd reports whenever it has readings)
  bool operator==(const SourceCommon&) const = default;
};

// A source as configured: the common keys, the type's own settings, and where it is written.
struct SourceConfig : SourceCommon {
  std::shared_ptr<const SourceSettings> settings;  // never null in a loaded config
  Position position;  // of the list item, for runtime messages that point back into the file
};

// Whether a reload may keep a source running: equal settings, wherever each is written. Every
// field counts by construction (the defaulted == of SourceCommon and of the type's settings), so
// a key added later cannot be forgotten (issue 8: metrics and disk_path once were).
inline bool same_settings(const SourceConfig& a, const SourceConfig& b) {
  if (!(static_cast<const SourceCommon&>(a) == static_cast<const SourceCommon&>(b))) return false;
  if (!a.settings || !b.settings) return a.settings == b.settings;
  return a.settings->equals(*b.settings);
}

// The type's own settings of `source`, or nullptr when it is of another type.
template <class S>
const S* settings_of(const SourceConfig& source) {
  return dynamic_cast<const S*>(source.settings.get());
}

// Where the problems of a load go: every one with its position, all reported at once.
class Report {
 public:
  virtual void error(Position at, std::string message) = 0;

 protected:
  ~Report() = default;
};

// What a source's keys may depend on beyond its own item.
struct SourceContext {
  std::filesystem::path plugin_dir;
};

// The source layer as the loader sees it (sources::source_types(), src/sources/registry.cpp):
// config/ turns each item of `sources:` into a Value tree, the types read their own keys.
class SourceTypes {
 public:
  // One item (a Value::Map). `path` is what messages call it ("sources[2]"). Every problem goes
  // to `report`; nullopt when there is no usable source.
  virtual std::optional<SourceConfig> parse(const Value& item, const std::string& path,
                                            const SourceContext& context, Report& report) const = 0;

 protected:
  ~SourceTypes() = default;
};

enum class DrainOrder { OldestFirst, NewestFirst };

struct QueueConfig {
  std::uint64_t max_size = 64ull << 20;  // bytes on disk
  Millis max_age = Millis(7ll * 24 * 3600 * 1000);
  DrainOrder order = DrainOrder::OldestFirst;
  double drain_rate = 0;  // readings per second while draining a backlog; 0 = unlimited
};

struct DeliveryConfig {
  // Payload bytes per request. 1024 keeps every request in one datagram (ThingsBoard's
  // MAX_MESSAGE_SIZE, docs/thingsboard-coap.md §1); larger values send batches with Block1.
  std::uint64_t max_batch_size = 1024;
  Millis flush_interval = 1s;    // how long readings may wait to be batched
  Millis backoff_initial = 1s;   // first retry ceiling
  Millis backoff_max = 5min;     // retry ceiling cap
  Millis shutdown_timeout = 5s;  // last flush on SIGTERM
  // Requests in flight at most while draining (RFC 7252 §4.7 NSTART). The uploader starts at 1
  // and grows on success, halves on loss and 5.00 (RFC 8085 §3.1); 1 = one at a time.
  unsigned max_in_flight = 32;
};

enum class BusKind { System, Session, None };

struct DbusConfig {
  BusKind bus = BusKind::System;
};

struct LoggingConfig {
  std::string level = "info";  // trace, debug, info, warning, error
};

// The downlink side (docs/attributes.md): `attributes:`, `remote:`, `rpc:` and
// `downlink:` of docs/interface.md.
struct RpcMethodConfig {
  std::vector<std::string> command;  // argv; no shell
  Millis timeout = 10s;
  bool operator==(const RpcMethodConfig&) const = default;
};

struct DownlinkConfig {
  Value attributes;                            // static client attributes: a Value::Map, or null
  std::map<std::string, std::string> remote;   // shared attribute key -> the setting it may set
  std::map<std::string, RpcMethodConfig> rpc;  // operator-defined server-side RPC methods
  // Observations are registered again this often: a server restart is silent for an observer
  // and NAT bindings expire within minutes (docs/thingsboard-coap.md §7).
  Millis reregister_interval = 2min;
  bool operator==(const DownlinkConfig&) const = default;
};

struct Config {
  std::filesystem::path file;  // where it was read from
  ServerConfig server;
  DeviceConfig device;
  ProvisioningConfig provisioning;
  CredentialsConfig credentials;
  std::filesystem::path state_dir = "/var/lib/tb-agent";
  std::filesystem::path plugin_dir = "/usr/lib/tb-agent/plugins";  // plugins given by name
  std::vector<SourceConfig> sources;
  QueueConfig queue;
  DeliveryConfig delivery;
  DbusConfig dbus;
  LoggingConfig logging;
  DownlinkConfig downlink;
};

struct Diagnostic {
  std::string file;
  Position position;
  std::string message;
  // "PATH:LINE:COL: message" (docs/interface.md, --check-config)
  std::string to_string() const;
};

struct LoadResult {
  std::optional<Config> config;  // set only when diagnostics is empty
  std::vector<Diagnostic> diagnostics;
  bool ok() const { return config.has_value(); }
};

// Neither throws: every problem, including an unreadable file or a YAML syntax error, comes
// back as a Diagnostic. Secrets (provisioning key/secret, access token) never appear in one.
// `types` reads the sources' own keys (sources::source_types()).
LoadResult load_file(const std::filesystem::path& path, const SourceTypes& types);
// `name` is what diagnostics call the file.
LoadResult load_string(const std::string& text, const std::string& name, const SourceTypes& types);

}  // namespace tb::config
