// The configuration as the rest of the agent sees it: plain, immutable structs. Only config/
// knows YAML exists. Every problem in a file is reported at once with its position (Kea style),
// and a config with any problem is never half-applied.
//
// The member initializers below are the defaults: the loader leaves a field alone when its key
// is absent (docs/configuration.md documents the same values; config_test.cpp checks them).
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <map>
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

struct ServerConfig {
  std::string host;              // required
  std::uint16_t port = 5683;     // RFC 7252 §6.1 default coap port
  Millis request_timeout = 30s;  // docs/thingsboard-coap.md recommends 15–30 s
  // Largest answer body accepted (Block2 included); ThingsBoard's answers are a few KiB at most.
  std::uint64_t max_response_size = 16 << 10;
};

struct DeviceConfig {
  std::string name;  // default: the machine's hostname
};

struct ProvisioningConfig {
  bool present = false;
  std::string key;
  std::string secret;       // from `secret` or read from `secret_file` (e.g. LoadCredential=)
  std::string secret_file;  // where the secret came from, if a file
};

struct CredentialsConfig {
  std::string access_token;  // empty = none configured
};

enum class SourceType { File, Exec, System, Plugin, Execd };

// What a `system` source can report (docs/sources.md lists the telemetry keys of each).
// All but cpu_cores are reported by default (an empty `metrics`).
inline constexpr std::array<std::string_view, 9> kSystemMetrics = {
    "cpu", "memory", "load", "uptime", "disk", "temperature", "swap", "network", "cpu_cores"};

// A typed value from the YAML, for a plugin's `options:` (yaml-cpp stays inside config/). Plain
// scalars are typed as YAML 1.2's core schema does (true/false, null/~, integers, finite
// numbers); quoted scalars are strings. Maps keep the file's order.
struct Value {
  struct Entry;  // one name: value of a map
  using List = std::vector<Value>;
  using Map = std::vector<Entry>;
  std::variant<std::monostate, bool, std::int64_t, double, std::string, List, Map> data;

  // Defined below, once Entry is complete (clang 14 refuses a defaulted == here).
  bool operator==(const Value& other) const;
};

// Not std::pair: libstdc++'s pair needs a complete Value where clang 14 instantiates it.
struct Value::Entry {
  std::string first;  // the option's name
  Value second;
  Entry() = default;
  Entry(std::string name, Value value) : first(std::move(name)), second(std::move(value)) {}
  bool operator==(const Entry&) const = default;
};

// Every field of Value (it has one).
inline bool Value::operator==(const Value& other) const { return data == other.data; }

// Bounds of an `options:` tree: a plugin's options are a few settings, not a data set.
inline constexpr int kMaxOptionDepth = 8;
inline constexpr std::size_t kMaxOptionNodes = 1000;
inline constexpr std::size_t kMaxOptionString = 4096;

// Everything that decides what a source does. A reload keeps a running source exactly when its
// settings compare equal, so every setting must live here: the defaulted == compares them all,
// and a new field cannot be forgotten (issue 8: metrics and disk_path once were).
struct SourceSettings {
  std::string name;
  SourceType type = SourceType::File;
  Millis interval = 30s;

  // type: file; type: plugin (the shared object, resolved against plugin_dir by the loader)
  std::string path;
  std::string key;
  double scale = 1.0;
  double offset = 0.0;

  // type: exec (and execd: command; timeout bounds how long --test waits for its first line)
  std::vector<std::string> command;        // argv; no shell
  Millis timeout = 5s;                     // exec, execd (--test) and plugin
  std::map<std::string, std::string> env;  // added to the program's small environment
  std::string working_directory = "/";     // must exist (checked when the source is built)

  // type: plugin
  Value options;  // the `options:` map (a Value::Map), or null

  // type: system
  std::vector<std::string> metrics;     // from kSystemMetrics; empty = all this machine has
  std::string disk_path = "/";          // the file system `disk` reports on
  std::vector<std::string> disks;       // more file systems `disk` reports, with prefixed keys
  std::vector<std::string> interfaces;  // `network`: names or globs; empty = all but lo
  std::vector<std::string> exclude_interfaces;  // `network`: names or globs left out

  bool operator==(const SourceSettings&) const = default;
};

// A source as configured: its settings, and where it is written. Nothing but the position goes
// here: a source that only moved within the file keeps running on reload.
struct SourceConfig : SourceSettings {
  Position position;  // of the list item, for runtime messages that point back into the file
};

// Whether a reload may keep a source running: equal settings, wherever each is written.
inline bool same_settings(const SourceConfig& a, const SourceConfig& b) {
  return static_cast<const SourceSettings&>(a) == static_cast<const SourceSettings&>(b);
}

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
LoadResult load_file(const std::filesystem::path& path);
// `name` is what diagnostics call the file.
LoadResult load_string(const std::string& text, const std::string& name);

}  // namespace tb::config
