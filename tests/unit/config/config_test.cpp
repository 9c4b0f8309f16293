// The config loader: values, defaults, and that every problem is reported at its position.
#include "config/config.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "sources/exec_source.hpp"
#include "sources/file_source.hpp"
#include "sources/plugin_source.hpp"
#include "sources/source_type.hpp"
#include "sources/system_source.hpp"

namespace tb::config {
namespace {

using namespace std::chrono_literals;
using ::testing::HasSubstr;

const std::string kData = std::string(TB_SOURCE_DIR) + "/tests/data/config/";

// The whole loader: config/ with the source types of src/sources/ reading their own keys.
const SourceTypes& types() { return sources::source_types(); }
LoadResult load(const std::string& text) { return load_string(text, "test.yaml", types()); }
LoadResult load_file(const std::string& path) { return config::load_file(path, types()); }

const sources::FileSettings& file(const SourceConfig& c) {
  return *settings_of<sources::FileSettings>(c);
}
const sources::ProgramSettings& program(const SourceConfig& c) {
  return *settings_of<sources::ProgramSettings>(c);
}
const sources::SystemSettings& system(const SourceConfig& c) {
  return *settings_of<sources::SystemSettings>(c);
}
const sources::PluginSettings& plugin(const SourceConfig& c) {
  return *settings_of<sources::PluginSettings>(c);
}

std::string all(const LoadResult& r) {
  std::string out;
  for (const auto& d : r.diagnostics) out += d.to_string() + "\n";
  return out;
}

// Loads `text` and expects exactly one diagnostic, at line:col, containing `needle`.
void expect_one(const std::string& text, int line, int column, const std::string& needle) {
  SCOPED_TRACE(text);
  const auto r = load(text);
  EXPECT_FALSE(r.ok());
  ASSERT_EQ(r.diagnostics.size(), 1u) << all(r);
  EXPECT_EQ(r.diagnostics[0].position.line, line) << all(r);
  EXPECT_EQ(r.diagnostics[0].position.column, column) << all(r);
  EXPECT_THAT(r.diagnostics[0].message, HasSubstr(needle));
}

std::string hostname() {
  char buf[256] = {};
  gethostname(buf, sizeof buf - 1);
  return buf;
}

// A file in a fresh temporary directory, removed with the object.
class TempFile {
 public:
  explicit TempFile(const std::string& content) {
    char dir[] = "/tmp/tb-config-test-XXXXXX";
    dir_ = mkdtemp(dir);
    path_ = dir_ + "/secret";
    std::ofstream(path_) << content;
  }
  ~TempFile() { std::filesystem::remove_all(dir_); }
  const std::string& path() const { return path_; }

 private:
  std::string dir_, path_;
};

TEST(Diagnostic, Format) {
  EXPECT_EQ((Diagnostic{"/etc/tb-agent.yaml", {3, 7}, "bad"}).to_string(),
            "/etc/tb-agent.yaml:3:7: bad");
  EXPECT_EQ((Diagnostic{"/etc/tb-agent.yaml", {}, "cannot open"}).to_string(),
            "/etc/tb-agent.yaml: cannot open");
}

TEST(Load, FullConfigHasEveryValue) {
  const auto r = load_file(kData + "valid-full.yaml");
  ASSERT_TRUE(r.ok()) << all(r);
  const Config& c = *r.config;
  EXPECT_EQ(c.file, kData + "valid-full.yaml");
  EXPECT_EQ(c.server.host, "tb.example.net");
  EXPECT_EQ(c.server.port, 5684);
  EXPECT_EQ(c.server.request_timeout, 20s);
  EXPECT_EQ(c.server.max_response_size, 64u << 10);
  EXPECT_EQ(c.device.name, "pump-7");
  EXPECT_TRUE(c.provisioning.present);
  EXPECT_EQ(c.provisioning.key, "PROVISION_DEVICE_KEY");
  EXPECT_EQ(c.provisioning.secret, "PROVISION_DEVICE_SECRET");
  EXPECT_EQ(c.provisioning.secret_file, "");
  EXPECT_EQ(c.credentials.access_token, "ACCESS_TOKEN_VALUE");
  EXPECT_EQ(c.state_dir, "/srv/tb-agent");

  ASSERT_EQ(c.sources.size(), 3u);
  const SourceConfig& room = c.sources[0];
  EXPECT_EQ(room.name, "room");
  EXPECT_EQ(room.type, "file");
  EXPECT_EQ(file(room).path, "/sys/bus/iio/devices/iio:device0/in_temp_input");
  EXPECT_EQ(file(room).key, "temperature");
  EXPECT_DOUBLE_EQ(file(room).scale, 0.001);
  EXPECT_DOUBLE_EQ(file(room).offset, -1.5);
  EXPECT_EQ(room.interval, 30s);
  EXPECT_EQ(room.position.line, 21);
  EXPECT_EQ(room.position.column, 5);
  const SourceConfig& sensors = c.sources[1];
  EXPECT_EQ(sensors.name, "sensors");
  EXPECT_EQ(sensors.type, "exec");
  EXPECT_EQ(program(sensors).command,
            (std::vector<std::string>{"/usr/local/bin/read-sensors", "--json"}));
  EXPECT_EQ(sensors.interval, 1min);
  EXPECT_EQ(program(sensors).timeout, 5s);
  const SourceConfig& host = c.sources[2];
  EXPECT_EQ(host.type, "system");
  EXPECT_EQ(host.interval, 10s);
  EXPECT_EQ(system(host).metrics, (std::vector<std::string>{"cpu", "memory", "disk"}));
  EXPECT_EQ(system(host).disk_path, "/var");

  EXPECT_EQ(c.queue.max_size, 16ull << 20);
  EXPECT_EQ(c.queue.max_age, 48h);
  EXPECT_EQ(c.queue.order, DrainOrder::NewestFirst);
  EXPECT_DOUBLE_EQ(c.queue.drain_rate, 50);
  EXPECT_EQ(c.delivery.max_batch_size, 4096u);
  EXPECT_EQ(c.delivery.flush_interval, 250ms);
  EXPECT_EQ(c.delivery.backoff_initial, 2s);
  EXPECT_EQ(c.delivery.backoff_max, 10min);
  EXPECT_EQ(c.delivery.shutdown_timeout, 3s);
  EXPECT_EQ(c.delivery.max_in_flight, 4u);
  EXPECT_EQ(c.dbus.bus, BusKind::Session);
  EXPECT_EQ(c.logging.level, "debug");
}

TEST(Load, Defaults) {
  const auto r = load_file(kData + "minimal.yaml");
  ASSERT_TRUE(r.ok()) << all(r);
  const Config& c = *r.config;
  EXPECT_EQ(c.server.host, "localhost");
  EXPECT_EQ(c.server.port, 5683);
  EXPECT_EQ(c.server.request_timeout, 30s);
  EXPECT_EQ(c.server.max_response_size, 16u << 10);
  EXPECT_EQ(c.device.name, hostname());
  EXPECT_FALSE(c.provisioning.present);
  EXPECT_EQ(c.credentials.access_token, "");
  EXPECT_EQ(c.state_dir, "/var/lib/tb-agent");
  EXPECT_TRUE(c.sources.empty());
  EXPECT_EQ(c.queue.max_size, 64ull << 20);
  EXPECT_EQ(c.queue.max_age, 7 * 24h);
  EXPECT_EQ(c.queue.order, DrainOrder::OldestFirst);
  EXPECT_EQ(c.queue.drain_rate, 0);
  EXPECT_EQ(c.delivery.max_batch_size, 1024u);
  EXPECT_EQ(c.delivery.flush_interval, 1s);
  EXPECT_EQ(c.delivery.backoff_initial, 1s);
  EXPECT_EQ(c.delivery.backoff_max, 5min);
  EXPECT_EQ(c.delivery.shutdown_timeout, 5s);
  EXPECT_EQ(c.delivery.max_in_flight, 32u);
  EXPECT_EQ(c.dbus.bus, BusKind::System);
  EXPECT_EQ(c.logging.level, "info");
}

TEST(Load, SourceDefaultsAndBareNumbers) {
  const auto r = load(R"(server: {host: h}
sources:
  - {name: a, type: file, path: /x, key: k}
  - {name: b, type: exec, command: [prog], interval: 0.5, timeout: 0.2}
)");
  ASSERT_TRUE(r.ok()) << all(r);
  EXPECT_EQ(r.config->sources[0].interval, 30s);
  EXPECT_EQ(file(r.config->sources[0]).scale, 1.0);
  EXPECT_EQ(file(r.config->sources[0]).offset, 0.0);
  EXPECT_EQ(r.config->sources[1].interval, 500ms);
  EXPECT_EQ(program(r.config->sources[1]).timeout, 200ms);
}

TEST(Load, EmptySectionsMeanDefaults) {
  const auto r = load("server:\n  host: h\nsources:\ndbus:\nqueue:\ncredentials:\n");
  ASSERT_TRUE(r.ok()) << all(r);
  EXPECT_TRUE(r.config->sources.empty());
  EXPECT_EQ(r.config->dbus.bus, BusKind::System);
}

TEST(Load, DefaultConfigFileLoads) {
  const auto r = load_file(std::string(TB_SOURCE_DIR) + "/config/tb-agent.yaml");
  EXPECT_TRUE(r.ok()) << all(r);
  EXPECT_TRUE(r.diagnostics.empty());
}

// --- each kind of error, at its position -----------------------------------------------------

TEST(Errors, WrongTypesAndRanges) {
  expect_one("server:\n  host: h\n  port: abc\n", 3, 9,
             "server.port: must be an integer from 1 to 65535, not 'abc'");
  expect_one("server:\n  host: h\n  port: 0\n", 3, 9, "from 1 to 65535");
  expect_one("server:\n  host: h\n  port: 65536\n", 3, 9, "from 1 to 65535");
  expect_one("server:\n  host: h\n  port: 56.83\n", 3, 9, "integer");
  expect_one("server:\n  host: {a: 1}\n", 2, 9, "server.host: expected a string, not a map");
  expect_one("server:\n  host: [a]\n", 2, 9, "not a list");
  expect_one("server:\n  host:\n", 2, 3, "server.host: has no value");
  expect_one("server:\n  host: ''\n", 2, 9, "must not be empty");
  expect_one("server:\n  host: coap://x\n", 2, 9, "not a URL");
  expect_one("server: h\n", 1, 9, "server: expected a map of keys, not a single value");
  expect_one("server:\n  host: h\n  request_timeout: 1y\n", 3, 20, "unknown duration unit 'y'");
  expect_one("server:\n  host: h\n  request_timeout: -1s\n", 3, 20, "negative");
  expect_one("server:\n  host: h\n  max_response_size: 512\n", 3, 22, "from 1.0 KiB to 16.0 MiB");
  expect_one("server:\n  host: h\nstate_dir: var/lib\n", 3, 12,
             "state_dir: must be an absolute path");
  expect_one("server:\n  host: h\nqueue:\n  drain_rate: -1\n", 4, 15,
             "queue.drain_rate: must be 0 or from 0.001 to 1e+09");
  expect_one("server:\n  host: h\nqueue:\n  drain_rate: fast\n", 4, 15, "must be a number");
  expect_one("server:\n  host: h\nqueue:\n  max_size: -5MiB\n", 4, 13, "negative");
  expect_one("server:\n  host: h\nqueue:\n  order: random\n", 4, 10, "oldest_first, newest_first");
  expect_one("server:\n  host: h\nlogging:\n  level: verbose\n", 4, 10,
             "trace, debug, info, warning, error");
  expect_one("server:\n  host: h\ndbus:\n  bus: user\n", 4, 8, "system, session, none");
}

// Issue 8 #10: a tiny rate passed and overflowed the pause computation (readings / rate).
TEST(Errors, DrainRateRange) {
  const std::string head = "server:\n  host: h\nqueue:\n  drain_rate: ";
  expect_one(head + "1e-300\n", 4, 15, "must be 0 or from 0.001 to 1e+09, not '1e-300'");
  expect_one(head + "0.0009\n", 4, 15, "must be 0 or from 0.001");
  expect_one(head + "2e9\n", 4, 15, "must be 0 or from 0.001");
  for (const char* ok : {"0", "0.001", "0.5", "1e9"}) {
    const auto r = load(head + ok + "\n");
    EXPECT_TRUE(r.ok()) << ok << ": " << all(r);
  }
}

// Issue 8 #6: bytes that are not UTF-8 passed the check and later broke JSON and D-Bus.
TEST(Errors, NotUtf8IsRefusedWithItsPosition) {
  // 0xE9 is Latin-1 'é'; column counts characters ("ü" before it is one).
  expect_one("server:\n  host: h\ndevice:\n  name: pump-\xC3\xBC\xE9\n", 4, 15, "not valid UTF-8");
  // In a key, a comment, a truncated sequence, an overlong form, a surrogate: all refused.
  expect_one("server:\n  host: h\n  po\xE9rt: 1\n", 3, 5, "not valid UTF-8");
  expect_one("server:\n  host: h # caf\xE9\n", 2, 16, "not valid UTF-8");
  expect_one("server:\n  host: h\ndevice: {name: \"\xE2\x82\"}\n", 3, 17, "not valid UTF-8");
  expect_one("server:\n  host: h\ndevice: {name: \"\xC0\xAF\"}\n", 3, 17, "not valid UTF-8");
  expect_one("server:\n  host: h\ndevice: {name: \"\xED\xA0\x80\"}\n", 3, 17, "not valid UTF-8");
  // One per line, every line.
  const auto r = load("server:\n  host: \xE9\ndevice: {name: \"\xE9\xE9\"}\n");
  ASSERT_EQ(r.diagnostics.size(), 2u) << all(r);
  EXPECT_EQ(r.diagnostics[1].to_string(),
            "test.yaml:3:17: not valid UTF-8 text (Latin-1 or another encoding?); save the file "
            "as UTF-8");
  // Valid multi-byte text is fine.
  const auto ok = load("server:\n  host: h\ndevice:\n  name: \"K\xC3\xBChlraum \xE2\x84\x96 3\"\n");
  ASSERT_TRUE(ok.ok()) << all(ok);
  EXPECT_EQ(ok.config->device.name, "K\xC3\xBChlraum \xE2\x84\x96 3");
}

// A quoted value is cut at 60 bytes; the cut must not split a character, or the message (and
// LastError on D-Bus after a refused reload) is not UTF-8.
TEST(Errors, QuotedValuesAreCutOnCharacterBoundaries) {
  std::string value = "a";
  for (int i = 0; i < 40; ++i) value += "\xC3\xA9";  // 'é', two bytes: byte 60 splits one
  const auto r = load("server:\n  host: h\n  port: \"" + value + "\"\n");
  ASSERT_EQ(r.diagnostics.size(), 1u) << all(r);
  const std::string& m = r.diagnostics[0].message;
  EXPECT_THAT(m, HasSubstr("not 'a\xC3\xA9"));
  EXPECT_THAT(m, HasSubstr("\xC3\xA9...'"));
  for (std::size_t i = 0; i < m.size(); ++i) {
    // Every lead byte 0xC3 is followed by its continuation byte.
    if (static_cast<unsigned char>(m[i]) == 0xC3) {
      ASSERT_LT(i + 1, m.size()) << m;
      EXPECT_EQ(static_cast<unsigned char>(m[i + 1]), 0xA9) << m;
    }
  }
}

TEST(Errors, DeliveryLimits) {
  expect_one("server: {host: h}\ndelivery:\n  max_batch_size: 63\n", 3, 19, "from 64 B to 1.0 MiB");
  expect_one("server: {host: h}\ndelivery:\n  max_batch_size: 1025KiB\n", 3, 19, "from 64 B");
  expect_one("server: {host: h}\ndelivery:\n  max_in_flight: 0\n", 3, 18, "from 1 to 256");
  expect_one("server: {host: h}\ndelivery:\n  max_in_flight: 257\n", 3, 18, "from 1 to 256");
  EXPECT_EQ(
      load("server: {host: h}\ndelivery:\n  max_in_flight: 1\n").config->delivery.max_in_flight,
      1u);
  expect_one("server: {host: h}\ndelivery:\n  backoff_initial: 10s\n  backoff_max: 5s\n", 4, 16,
             "delivery.backoff_max (5s) must be at least delivery.backoff_initial (10s)");
  // backoff_max left at its default (5m): the problem is the initial value.
  expect_one("server: {host: h}\ndelivery:\n  backoff_initial: 1h\n", 3, 20, "backoff_max (5m)");
  EXPECT_TRUE(load("server: {host: h}\ndelivery:\n  max_batch_size: 1MiB\n  backoff_initial: 5s\n  "
                   "backoff_max: 5s\n")
                  .ok());
}

TEST(Errors, UnknownMissingAndDuplicateKeys) {
  expect_one("server:\n  host: h\n  hots: x\n", 3, 3,
             "server: unknown key 'hots' (known keys: host, port, request_timeout, "
             "max_response_size, dtls)");
  expect_one("server:\n  host: h\nservre: 1\n", 3, 1, "unknown key 'servre'");
  expect_one("server:\n  port: 1\n", 1, 1, "server: missing required key 'host'");
  expect_one("device:\n  name: x\n", 1, 1, "missing required key 'server'");
  expect_one("server:\n  host: h\n  host: i\n", 3, 3,
             "server.host: duplicate key (first given at line 2)");
  expect_one("server:\n  host: h\n  [a]: 1\n", 3, 3, "a key must be a plain name");
  // A quote slip runs lines together into one "key"; it is not quoted back (it may hold a
  // secret's line).
  const auto r = load("server: {host: h}\n'credentials: access_token: T0KEN': 1\n");
  ASSERT_EQ(r.diagnostics.size(), 1u) << all(r);
  EXPECT_EQ(r.diagnostics[0].to_string(),
            "test.yaml:2:1: unknown key (known keys: server, device, provisioning, credentials, "
            "state_dir, plugin_dir, sources, queue, delivery, dbus, logging, attributes, remote, "
            "rpc, downlink)");
}

TEST(Errors, Provisioning) {
  expect_one("server: {host: h}\nprovisioning:\n  key: k\n", 2, 1,
             "provisioning: missing required key 'secret' (or 'secret_file')");
  expect_one("server: {host: h}\nprovisioning:\n  secret: s\n", 2, 1,
             "provisioning: missing required key 'key'");
  TempFile file("s");
  expect_one("server: {host: h}\nprovisioning:\n  key: k\n  secret: s\n  secret_file: " +
                 file.path() + "\n",
             5, 3, "mutually exclusive");
  const auto r = load("server: {host: h}\nprovisioning:\n");
  EXPECT_EQ(r.diagnostics.size(), 2u) << all(r);  // key and secret
  expect_one("server: {host: h}\ncredentials:\n  access_token: ''\n", 3, 17, "must not be empty");
}

TEST(Errors, Sources) {
  const std::string head = "server: {host: h}\nsources:\n";
  expect_one(head + "  - name: a\n    type: system\n    metrics: [cpu, disks]\n", 5, 20,
             "sources[0].metrics[1]: unknown metric 'disks' (use cpu, memory, load, uptime, "
             "disk, temperature, swap, network, cpu_cores)");
  expect_one(head + "  - name: a\n    type: system\n    metrics: [cpu, cpu]\n", 5, 20,
             "sources[0].metrics[1]: 'cpu' is listed twice");
  expect_one(head + "  - name: a\n    type: system\n    metrics: []\n", 5, 14,
             "sources[0].metrics: expected a non-empty list");
  expect_one(head + "  - name: a\n    type: system\n    disk_path: var\n", 5, 16,
             "must be an absolute path");
  expect_one(head + "  - name: a\n    type: system\n    key: k\n", 5, 5,
             "sources[0].key: only file sources have this key, not system sources");
  // Keys that belong to the unsupported type are not piled on top.
  expect_one(head + "  - name: a\n    type: plugin\n    path: x/y.so\n", 5, 11,
             "sources[0].path: must be an absolute path or a plugin name");
  expect_one(head + "  - name: a\n    type: file\n    path: name\n    key: k\n", 5, 11,
             "sources[0].path: must be an absolute path");
  expect_one(head + "  - name: a\n    type: plugin\n    path: p\n    options: [1]\n", 6, 14,
             "sources[0].options: expected a map of option names to values, not a list");
  expect_one(head +
                 "  - name: a\n    type: plugin\n    path: p\n    options: {a: {b: {c: {d: "
                 "{e: {f: {g: {h: {i: 1}}}}}}}}}\n",
             6, 50, "nested too deeply (at most 8 levels)");
  expect_one(head + "  - name: a\n    type: fiel\n", 4, 11,
             "unknown source type 'fiel' (use file, exec, system, execd or plugin)");
  expect_one(head + "  - name: a\n    path: /x\n", 3, 5, "sources[0]: missing required key 'type'");
  expect_one(head + "  - type: exec\n    command: [x]\n", 3, 5,
             "sources[0]: missing required key 'name'");
  expect_one(head + "  - {name: a, type: file, key: k}\n", 3, 5, "missing required key 'path'");
  expect_one(head + "  - {name: a, type: file, path: /x}\n", 3, 5, "missing required key 'key'");
  expect_one(head + "  - {name: a, type: exec}\n", 3, 5, "missing required key 'command'");
  expect_one(head + "  - name: a\n    type: file\n    path: /x\n    key: k\n    command: [x]\n", 7,
             5, "sources[0].command: only exec and execd sources have this key, not file sources");
  expect_one(head + "  - name: a\n    type: exec\n    command: [x]\n    scale: 2\n", 6, 5,
             "only file sources have this key");
  expect_one(head + "  - name: a\n    type: exec\n    command: x\n", 5, 14,
             "expected a list of strings");
  expect_one(head + "  - name: a\n    type: exec\n    command: []\n", 5, 14,
             "at least the program");
  expect_one(head + "  - name: a\n    type: exec\n    command: [x, {a: 1}]\n", 5, 18,
             "sources[0].command[1]: expected a string");
  expect_one(
      head + "  - name: a\n    type: exec\n    command: [x]\n    interval: 2s\n    timeout: 3s\n",
      7, 14, "sources[0].timeout (3s) must not be longer than interval (2s)");
  {
    // Without an explicit timeout a short interval is the timeout.
    auto r = load(head + "  - name: a\n    type: exec\n    command: [x]\n    interval: 2s\n");
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(program(r.config->sources[0]).timeout, tb::Millis(2000));
  }
  // An invalid timeout is reported once, not again as "the default is too long".
  expect_one(head + "  - {name: a, type: exec, command: [x], interval: 1s, timeout: 1y}\n", 3, 64,
             "unknown duration unit");
  expect_one("server: {host: h}\ndelivery: {backoff_initial: 10m, backoff_max: x}\n", 2, 47,
             "delivery.backoff_max:");
  expect_one(head + "  - {name: a, type: file, path: /x, key: k, interval: 99ms}\n", 3, 55,
             "must be at least 100ms");
  expect_one(head + "  - {name: a, type: file, path: x, key: k}\n", 3, 33, "absolute path");
  expect_one(head + "  - {name: a, type: file, path: /x, key: k, scale: x}\n", 3, 52,
             "must be a number");
  expect_one(head + "  - {name: a, type: file, path: /x, key: k, scale: .nan}\n", 3, 52,
             "must be a number");
  expect_one(
      head +
          "  - {name: a, type: file, path: /x, key: k}\n  - {name: a, type: exec, command: [x]}\n",
      4, 12, "sources[1].name: duplicate source name 'a' (first used at line 3)");
  expect_one(head + "  - just-a-string\n", 3, 5, "sources[0]: expected a map");
  expect_one("server: {host: h}\nsources: {a: 1}\n", 2, 10, "sources: expected a list of sources");
}

TEST(Errors, Document) {
  auto r = load("");
  ASSERT_EQ(r.diagnostics.size(), 1u);
  EXPECT_EQ(r.diagnostics[0].to_string(),
            "test.yaml: the configuration is empty; at least server.host is required");
  r = load("# only a comment\n");
  ASSERT_EQ(r.diagnostics.size(), 1u);
  EXPECT_THAT(r.diagnostics[0].message, HasSubstr("empty"));
  expect_one("- a\n- b\n", 1, 1, "the top level must be a map");
  expect_one("just text\n", 1, 1, "the top level must be a map");
  expect_one("server: {host: h}\n---\nserver: {host: i}\n", 2, 1, "only one YAML document");
  // yaml-cpp 0.7 turns a stray top-level ',' into endless empty documents; this must end.
  expect_one("# comment\n  ,\nserver: {host: h}\n", 2, 3, "the top level must be a map");
  r = load("---\n");
  ASSERT_EQ(r.diagnostics.size(), 1u);
  EXPECT_THAT(r.diagnostics[0].message, HasSubstr("empty"));
}

TEST(Errors, YamlSyntax) {
  expect_one("server:\n  host: [a\n", 3, 1, "YAML syntax error: end of sequence flow not found");
  expect_one("server:\n  host: h\n port: 1\n", 3, 2, "YAML syntax error: end of map not found");
  expect_one("server:\n\t host: h\n", 2, 7, "YAML does not allow tabs for indentation");
}

TEST(Errors, UnreadableFile) {
  const auto r = load_file("/nonexistent/tb-agent.yaml");
  ASSERT_EQ(r.diagnostics.size(), 1u);
  EXPECT_EQ(r.diagnostics[0].to_string(),
            "/nonexistent/tb-agent.yaml: cannot open: No such file or directory");
  const auto dir = load_file("/tmp");
  ASSERT_EQ(dir.diagnostics.size(), 1u);
  EXPECT_THAT(dir.diagnostics[0].message, HasSubstr("directory"));
}

// The fixture integration tests run through `tb-agent --check-config`; its header comment
// lists the expected output, which this test keeps honest.
TEST(Errors, BrokenMany) {
  const std::string path = kData + "broken-many.yaml";
  const auto r = load_file(path);
  std::vector<std::string> expected;
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("#   ", 0) == 0) expected.push_back(path + ":" + line.substr(4));
  }
  ASSERT_EQ(expected.size(), 15u);
  std::vector<std::string> got;
  for (const auto& d : r.diagnostics) got.push_back(d.to_string());
  EXPECT_EQ(got, expected);
}

TEST(Errors, ManyAtOnceAllReported) {
  const auto r = load(R"(server:
  host: ''
  port: 0
device: []
state_dir: relative
queue:
  max_age: forever
sources:
  - name: a
    type: exec
    command: [x]
    timeout: 0
logging:
  level: loud
)");
  std::vector<std::pair<int, int>> at;
  for (const auto& d : r.diagnostics) at.emplace_back(d.position.line, d.position.column);
  EXPECT_EQ(at, (std::vector<std::pair<int, int>>{
                    {2, 9}, {3, 9}, {4, 9}, {5, 12}, {7, 12}, {12, 14}, {14, 10}}))
      << all(r);
}

// --- secrets ---------------------------------------------------------------------------------

TEST(Secrets, SecretFileIsRead) {
  TempFile file("s3cr3t-from-file\n");
  const auto r =
      load("server: {host: h}\nprovisioning:\n  key: k\n  secret_file: " + file.path() + "\n");
  ASSERT_TRUE(r.ok()) << all(r);
  EXPECT_EQ(r.config->provisioning.secret, "s3cr3t-from-file");  // final newline dropped
  EXPECT_EQ(r.config->provisioning.secret_file, file.path());
}

TEST(Secrets, SecretFileProblems) {
  const std::string head = "server: {host: h}\nprovisioning:\n  key: k\n  secret_file: ";
  expect_one(head + "/nonexistent/secret\n", 4, 16,
             "provisioning.secret_file: '/nonexistent/secret' cannot open: No such file");
  expect_one(head + "relative/secret\n", 4, 16, "absolute path");
  expect_one(head + "/tmp\n", 4, 16, "is a directory");
  TempFile empty("\n");
  expect_one(head + empty.path() + "\n", 4, 16, "is empty");
  TempFile latin1(
      "s\xE9"
      "cret\n");
  expect_one(head + latin1.path() + "\n", 4, 16, "is not UTF-8 text");
  expect_one(head + "/dev/null\n", 4, 16, "is not a regular file");
}

// Issue 8 #9: a FIFO without a writer blocked open(2) forever: --check-config hung, and a reload
// would have hung the loop. It must be refused at once.
TEST(Secrets, SecretFileFifoWithoutWriterIsRefusedPromptly) {
  char dir[] = "/tmp/tb-config-test-XXXXXX";
  ASSERT_TRUE(mkdtemp(dir));
  const std::string fifo = std::string(dir) + "/secret";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  // Run in a child, so that the old, blocking code fails this test instead of hanging it.
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    alarm(10);
    const auto r =
        load("server: {host: h}\nprovisioning:\n  key: k\n  secret_file: " + fifo + "\n");
    const bool refused =
        r.diagnostics.size() == 1 &&
        r.diagnostics[0].message.find("is not a regular file") != std::string::npos;
    _exit(refused ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  std::filesystem::remove_all(dir);
  ASSERT_TRUE(WIFEXITED(status)) << "the load hung (killed by SIGALRM) or crashed";
  EXPECT_EQ(WEXITSTATUS(status), 0) << "not refused as 'is not a regular file'";
}

TEST(Secrets, NeverInDiagnostics) {
  TempFile file("FILE-SECRET-42");
  // Every secret is present and something is wrong next to each; the secret file's content is
  // also pasted as a device name, which is quoted back only after redaction.
  const auto r = load(R"(server: {host: h, port: 0}
device: {name: "FILE-SECRET-42"}
provisioning:
  key: KEY-SECRET-1
  secret: INLINE-SECRET-2
  secret_file: )" + file.path() +
                      R"(
  TOKEN-AS-KEY-3: x
credentials:
  access_token: TOKEN-SECRET-4
  TOKEN-AS-KEY-5: y
sources:
  - {name: "INLINE-SECRET-2", type: file, path: relative, key: k}
dbus: {bus: "TOKEN-SECRET-4"}
)");
  ASSERT_FALSE(r.diagnostics.empty());
  const std::string text = all(r);
  for (const char* secret : {"FILE-SECRET-42", "KEY-SECRET-1", "INLINE-SECRET-2", "TOKEN-AS-KEY-3",
                             "TOKEN-SECRET-4", "TOKEN-AS-KEY-5"}) {
    EXPECT_THAT(text, ::testing::Not(HasSubstr(secret))) << text;
  }
  EXPECT_THAT(text, HasSubstr("mutually exclusive"));
  EXPECT_THAT(text, HasSubstr("dbus.bus: must be one of system, session, none, not '<redacted>'"));
  EXPECT_THAT(text, HasSubstr("credentials: unknown key (known keys: access_token, type)"));
}

}  // namespace
}  // namespace tb::config

namespace tb::config {
namespace {

// --- type: plugin ----------------------------------------------------------------------------

TEST(Plugin, OptionsAreTypedValuesInFileOrder) {
  const auto r = load(
      "server: {host: h}\nsources:\n  - name: p\n    type: plugin\n    path: /opt/p.so\n"
      "    options:\n      s: text\n      q: \"42\"\n      i: -7\n      d: 2.5\n      e: 1e3\n"
      "      b: true\n      n: ~\n      l: [1, two]\n      m: {k: false}\n");
  ASSERT_TRUE(r.ok()) << all(r);
  const auto& src = r.config->sources.at(0);
  EXPECT_EQ(src.type, "plugin");
  EXPECT_EQ(plugin(src).path, "/opt/p.so");
  EXPECT_EQ(plugin(src).timeout, 5s);
  const Value::Map expected = {
      {"s", {std::string("text")}},
      {"q", {std::string("42")}},  // quoted: a string
      {"i", {std::int64_t{-7}}},
      {"d", {2.5}},
      {"e", {1000.0}},
      {"b", {true}},
      {"n", {}},
      {"l", {Value::List{{std::int64_t{1}}, {std::string("two")}}}},
      {"m", {Value::Map{{"k", {false}}}}},
  };
  EXPECT_EQ(plugin(src).options, Value{expected});
}

TEST(Plugin, ANameIsLookedUpInPluginDir) {
  const std::string head = "server: {host: h}\nsources:\n  - {name: p, type: plugin, path: ";
  auto path = [&](const std::string& tail) {
    const auto r = load(head + tail);
    EXPECT_TRUE(r.ok()) << all(r);
    return r.ok() ? plugin(r.config->sources.at(0)).path : std::string();
  };
  EXPECT_EQ(path("hwmon}\n"), "/usr/lib/tb-agent/plugins/hwmon.so");
  EXPECT_EQ(path("hwmon.so}\n"), "/usr/lib/tb-agent/plugins/hwmon.so");
  // plugin_dir may come after the sources.
  EXPECT_EQ(path("hwmon}\nplugin_dir: /opt/plugins\n"), "/opt/plugins/hwmon.so");
  EXPECT_EQ(path("/elsewhere/x.so}\nplugin_dir: /opt/plugins\n"), "/elsewhere/x.so");
  // The timeout fits a short interval, as for exec.
  const auto r = load(head + "p, interval: 1s}\n");
  ASSERT_TRUE(r.ok()) << all(r);
  EXPECT_EQ(plugin(r.config->sources.at(0)).timeout, 1s);
}

TEST(Plugin, OptionsAreBounded) {
  std::string many =
      "server: {host: h}\nsources:\n  - name: p\n    type: plugin\n    path: p\n"
      "    options:\n      l: [";
  for (int i = 0; i < 1001; ++i) many += "1,";
  many += "1]\n";
  const auto r = load(many);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(all(r), HasSubstr("too many options (at most 1000 values)"));
  const auto long_text = load(
      "server: {host: h}\nsources:\n  - name: p\n    type: plugin\n"
      "    path: p\n    options: {s: " +
      std::string(5000, 'x') + "}\n");
  EXPECT_THAT(all(long_text), HasSubstr("longer than 4096 bytes"));
}

// --- reload: which sources a reload restarts --------------------------------------------------

// The keys a source of `type` has, from the declaration tables (src/sources/): the common ones
// that apply to it, then its own.
std::vector<std::string> source_keys(const std::string& type) {
  const auto* t = sources::find_type(type);
  EXPECT_NE(t, nullptr) << type;
  std::vector<std::string> keys;
  if (!t) return keys;
  for (const auto& k : sources::common_keys())
    if (k.name != "interval" || t->periodic) keys.emplace_back(k.name);
  for (const auto& k : t->keys) keys.emplace_back(k.name);
  return keys;
}

// The "known keys" an unknown key's message lists are the declared ones.
TEST(Declarations, UnknownKeyMessagesListTheDeclaredKeys) {
  for (const auto* t : sources::all_types()) {
    const std::string type(t->name);
    const auto r = load("server: {host: h}\nsources:\n  - {name: s, type: " + type + ", zzz: 1}\n");
    std::string expected;
    for (const auto& k : source_keys(type)) expected += (expected.empty() ? "" : ", ") + k;
    EXPECT_THAT(all(r), HasSubstr("unknown key 'zzz' (known keys: " + expected + ")")) << type;
  }
}

// Every declared key has a type and a description for the docs; a required one has no
// default; every default is valid (a source with only its required keys loads).
TEST(Declarations, AreCompleteAndTheirDefaultsLoad) {
  EXPECT_EQ(sources::all_types().size(), 5u);
  for (const auto* t : sources::all_types()) {
    std::set<std::string_view> names;
    for (const auto& k : t->keys) {
      EXPECT_TRUE(names.insert(k.name).second) << t->name << "." << k.name << " declared twice";
      EXPECT_FALSE(k.type.empty()) << t->name << "." << k.name;
      EXPECT_FALSE(k.description.empty()) << t->name << "." << k.name;
      if (k.need == Need::Required) {
        EXPECT_TRUE(k.default_text.empty()) << k.name;
      }
    }
  }
  const auto r = load(
      "server: {host: h}\nsources:\n  - {name: a, type: file, path: /x, key: k}\n"
      "  - {name: b, type: exec, command: [x]}\n  - {name: c, type: system}\n"
      "  - {name: d, type: execd, command: [x]}\n  - {name: e, type: plugin, path: p}\n");
  ASSERT_TRUE(r.ok()) << all(r);
  EXPECT_EQ(r.config->sources[0].interval, 30s);
  EXPECT_EQ(r.config->sources[3].interval, Millis(0));  // execd has none
  EXPECT_EQ(system(r.config->sources[2]).disk_path, "/");
  EXPECT_EQ(program(r.config->sources[1]).working_directory, "/");
  EXPECT_EQ(program(r.config->sources[3]).timeout, 5s);
}

// Issue 8 #7: a reload compared sources field by field and forgot metrics and disk_path, so a
// changed system source kept running with its old keys. Every key of every type must count;
// the list of keys comes from the declaration tables, so a key added later without a line here
// fails (and so does a type added without its block).
TEST(Reload, EveryKeyOfEveryTypeChangesTheSettings) {
  struct Type {
    std::string name;
    std::map<std::string, std::pair<std::string, std::string>> values;  // key → (before, after)
  };
  const std::vector<Type> types = {
      {"file",
       {{"name", {"s", "t"}},
        {"interval", {"1s", "2s"}},
        {"path", {"/a", "/b"}},
        {"key", {"k", "l"}},
        {"scale", {"1", "2"}},
        {"offset", {"0", "1"}}}},
      {"exec",
       {{"name", {"s", "t"}},
        {"interval", {"10s", "20s"}},
        {"command", {"[/bin/true]", "[/bin/true, x]"}},
        {"timeout", {"1s", "2s"}},
        {"env", {"{A: '1'}", "{A: '2'}"}},
        {"working_directory", {"/", "/tmp"}}}},
      {"system",
       {{"name", {"s", "t"}},
        {"interval", {"1s", "2s"}},
        {"metrics", {"[load]", "[memory]"}},
        {"disk_path", {"/", "/tmp"}},
        {"disks", {"[/]", "[/tmp]"}},
        {"interfaces", {"[eth0]", "[eth*]"}},
        {"exclude_interfaces", {"[docker0]", "[veth*]"}}}},
      {"execd",
       {{"name", {"s", "t"}},
        {"command", {"[/bin/true]", "[/bin/true, x]"}},
        {"timeout", {"1s", "2s"}},
        {"env", {"{A: '1'}", "{A: '2'}"}},
        {"working_directory", {"/", "/tmp"}}}},
      {"plugin",
       {{"name", {"s", "t"}},
        {"interval", {"10s", "20s"}},
        {"path", {"/a.so", "hwmon"}},
        {"timeout", {"1s", "2s"}},
        {"options", {"{a: 1, b: [x]}", "{a: 1, b: [y]}"}}}},
  };
  auto source = [](const LoadResult& r) {
    EXPECT_TRUE(r.ok()) << all(r);
    return r.ok() ? r.config->sources.at(0) : SourceConfig{};
  };
  std::set<std::string> tested;
  for (const auto& type : types) tested.insert(type.name);
  for (const auto* t : sources::all_types())
    EXPECT_TRUE(tested.count(std::string(t->name))) << "type " << t->name << " is not tested here";
  for (const auto& type : types) {
    std::set<std::string> covered{"type"};  // the type is checked below
    for (const auto& [k, v] : type.values) covered.insert(k);
    for (const auto& k : source_keys(type.name))
      EXPECT_TRUE(covered.count(k)) << type.name << " source key '" << k << "' is not tested here";

    auto text = [&](const std::string& changed, bool after, const std::string& lead = "") {
      std::string out = "server: {host: h}\nsources:\n" + lead + "  - type: " + type.name + "\n";
      for (const auto& [k, v] : type.values)
        out += "    " + k + ": " + (k == changed && after ? v.second : v.first) + "\n";
      return out;
    };
    const SourceConfig base = source(load(text("", false)));
    // Moved within the file: the same settings (the source keeps running).
    const SourceConfig moved = source(load(text("", false, "\n\n")));
    EXPECT_NE(moved.position.line, base.position.line);
    EXPECT_TRUE(same_settings(base, moved)) << type.name;
    for (const auto& [k, v] : type.values) {
      const SourceConfig changed = source(load(text(k, true)));
      EXPECT_FALSE(same_settings(base, changed)) << type.name << "." << k << " changed";
    }
  }
  SourceConfig file, exec;
  exec.type = "exec";
  EXPECT_FALSE(same_settings(file, exec));
  SourceConfig execd;
  execd.type = "execd";
  EXPECT_FALSE(same_settings(exec, execd));
}

// env: NAME: value pairs, names checked, values never quoted back; working_directory absolute.
TEST(Exec, EnvAndWorkingDirectory) {
  const std::string head =
      "server: {host: h}\nsources:\n  - name: s\n    type: exec\n"
      "    command: [/bin/true]\n";
  auto r = load(head + "    env: {MODEM: /dev/ttyUSB2, LEVEL: 3}\n    working_directory: /tmp\n");
  ASSERT_TRUE(r.ok()) << all(r);
  const auto& s = r.config->sources.at(0);
  EXPECT_EQ(program(s).env,
            (std::map<std::string, std::string>{{"LEVEL", "3"}, {"MODEM", "/dev/ttyUSB2"}}));
  EXPECT_EQ(program(s).working_directory, "/tmp");
  r = load(head);
  ASSERT_TRUE(r.ok()) << all(r);
  EXPECT_TRUE(program(r.config->sources.at(0)).env.empty());
  EXPECT_EQ(program(r.config->sources.at(0)).working_directory, "/");
  r = load(head + "    env: {1BAD: SECRET-VALUE-7, OK: [x]}\n");
  EXPECT_FALSE(r.ok());
  EXPECT_THAT(all(r), HasSubstr("'1BAD' is not a variable name"));
  EXPECT_THAT(all(r), HasSubstr("sources[0].env.OK: expected a string, not a list"));
  EXPECT_THAT(all(r), ::testing::Not(HasSubstr("SECRET-VALUE-7")));
  r = load(head + "    env: [A=1]\n");
  EXPECT_THAT(all(r), HasSubstr("sources[0].env: expected a map of NAME: value"));
  r = load(head + "    working_directory: tmp\n");
  EXPECT_THAT(all(r), HasSubstr("sources[0].working_directory: must be an absolute path"));
  r = load(
      "server: {host: h}\nsources:\n  - {name: s, type: file, path: /a, key: k, env: {A: b}}\n");
  EXPECT_THAT(all(r), HasSubstr("sources[0].env: only exec and execd sources have this key"));
}

// execd has no interval (its program reports when it has readings): the key is refused there.
TEST(Execd, HasCommandAndTimeoutButNoInterval) {
  auto r = load("server: {host: h}\nsources:\n  - {name: m, type: execd, command: [/bin/cat]}\n");
  ASSERT_TRUE(r.ok()) << all(r);
  EXPECT_EQ(r.config->sources.at(0).type, "execd");
  EXPECT_EQ(program(r.config->sources.at(0)).command, std::vector<std::string>{"/bin/cat"});
  r = load(
      "server: {host: h}\nsources:\n  - {name: m, type: execd, command: [/bin/cat], "
      "interval: 5s}\n");
  EXPECT_FALSE(r.ok());
  EXPECT_THAT(all(r), HasSubstr("interval"));
  r = load("server: {host: h}\nsources:\n  - {name: m, type: execd}\n");
  EXPECT_FALSE(r.ok());
  EXPECT_THAT(all(r), HasSubstr("command"));
}

TEST(Dtls, DefaultsFollowTheServer) {
  // No dtls: plain coap on 5683.
  auto r = load("server: {host: tb.example}\ncredentials: {access_token: t}\n");
  ASSERT_TRUE(r.ok()) << all(r);
  EXPECT_FALSE(r.config->server.dtls.enabled);
  EXPECT_EQ(r.config->server.port, 5683);
  // dtls present: 5684, the server's name checked, the system CA bundle (Debian's here).
  r = load("server:\n  host: tb.example\n  dtls: {}\ncredentials: {access_token: t}\n");
  ASSERT_TRUE(r.ok()) << all(r);
  EXPECT_TRUE(r.config->server.dtls.enabled);
  EXPECT_EQ(r.config->server.port, 5684);
  EXPECT_EQ(r.config->server.dtls.server_name, "tb.example");
  EXPECT_FALSE(r.config->server.dtls.ca_file.empty());
  // An explicit port and name win.
  r = load(
      "server:\n  host: 10.0.0.5\n  port: 6000\n  dtls: {server_name: tb.example, ca_dir: "
      "/etc/ssl/certs}\ncredentials: {access_token: t}\n");
  ASSERT_TRUE(r.ok()) << all(r);
  EXPECT_EQ(r.config->server.port, 6000);
  EXPECT_EQ(r.config->server.dtls.server_name, "tb.example");
  EXPECT_EQ(r.config->server.dtls.ca_dir, "/etc/ssl/certs");
  EXPECT_TRUE(r.config->server.dtls.ca_file.empty());  // a directory given: no bundle added
}

TEST(Dtls, FilesAreCheckedWithTheirPositions) {
  const auto r = load(
      "server:\n  host: tb.example\n  dtls:\n    ca_file: /nonexistent/ca.pem\n"
      "    cert_file: /nonexistent/device.crt\n    surprise: 1\ncredentials: {access_token: t}\n");
  EXPECT_FALSE(r.ok());
  const std::string text = all(r);
  EXPECT_NE(text.find("test.yaml:4:"), std::string::npos) << text;
  EXPECT_NE(text.find("server.dtls.ca_file: cannot read /nonexistent/ca.pem"), std::string::npos)
      << text;
  EXPECT_NE(text.find("key_file is missing"), std::string::npos) << text;
  EXPECT_NE(text.find("surprise"), std::string::npos) << text;
}

TEST(X509, CredentialsTypeNeedsTheCertificateInServerDtls) {
  char dir_template[] = "/tmp/tb-x509-cfg-XXXXXX";
  const std::string dir = mkdtemp(dir_template);
  const std::string crt = dir + "/d.crt", key = dir + "/d.key";
  std::ofstream(crt) << "x";
  std::ofstream(key) << "x";
  ::chmod(key.c_str(), 0600);
  const std::string dtls =
      "  dtls: {ca_file: " + crt + ", cert_file: " + crt + ", key_file: " + key + "}\n";
  // Pre-registered: the certificate is the credential, no token.
  auto r = load("server:\n  host: tb.example\n" + dtls + "credentials: {type: x509_certificate}\n");
  ASSERT_TRUE(r.ok()) << all(r);
  EXPECT_EQ(r.config->credentials.type, CredentialsType::X509Certificate);
  EXPECT_TRUE(r.config->credentials.configured());
  // The default stays the token.
  r = load("server: {host: h}\ncredentials: {access_token: t}\n");
  ASSERT_TRUE(r.ok()) << all(r);
  EXPECT_EQ(r.config->credentials.type, CredentialsType::AccessToken);
  EXPECT_EQ(r.config->provisioning.credentials_type, CredentialsType::AccessToken);
  // No DTLS, or DTLS without a certificate: refused where the type is given.
  expect_one("server: {host: h}\ncredentials:\n  type: x509_certificate\n", 3, 9,
             "needs server.dtls with cert_file and key_file");
  expect_one("server:\n  host: h\n  dtls: {ca_file: " + crt +
                 "}\ncredentials:\n  type: x509_certificate\n",
             5, 9, "needs server.dtls with cert_file and key_file");
  // A token beside it is a contradiction.
  expect_one("server:\n  host: tb.example\n" + dtls +
                 "credentials:\n  type: x509_certificate\n  access_token: S3cretT0ken\n",
             5, 9, "remove credentials.access_token");
  expect_one("server: {host: h}\ncredentials:\n  type: pem\n", 3, 9, "must be one of");
  std::filesystem::remove_all(dir);
}

TEST(X509, ProvisioningCredentialsTypeNeedsServerDtls) {
  auto r = load(
      "server:\n  host: tb.example\n  dtls: {}\nprovisioning:\n  key: k\n  secret: s\n"
      "  credentials_type: x509_certificate\n");
  ASSERT_TRUE(r.ok()) << all(r);
  EXPECT_EQ(r.config->provisioning.credentials_type, CredentialsType::X509Certificate);
  EXPECT_FALSE(r.config->credentials.configured());
  expect_one(
      "server: {host: h}\nprovisioning:\n  key: k\n  secret: s\n"
      "  credentials_type: x509_certificate\n",
      5, 21, "provisioning.credentials_type: x509_certificate needs server.dtls");
}

}  // namespace
}  // namespace tb::config
