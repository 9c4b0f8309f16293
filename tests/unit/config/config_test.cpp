// The config loader: values, defaults, and that every problem is reported at its position.
#include "config/config.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

namespace tb::config {
namespace {

using namespace std::chrono_literals;
using ::testing::HasSubstr;

const std::string kData = std::string(TB_SOURCE_DIR) + "/tests/data/config/";

LoadResult load(const std::string& text) { return load_string(text, "test.yaml"); }

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
  EXPECT_EQ(room.type, SourceType::File);
  EXPECT_EQ(room.path, "/sys/bus/iio/devices/iio:device0/in_temp_input");
  EXPECT_EQ(room.key, "temperature");
  EXPECT_DOUBLE_EQ(room.scale, 0.001);
  EXPECT_DOUBLE_EQ(room.offset, -1.5);
  EXPECT_EQ(room.interval, 30s);
  EXPECT_EQ(room.position.line, 21);
  EXPECT_EQ(room.position.column, 5);
  const SourceConfig& sensors = c.sources[1];
  EXPECT_EQ(sensors.name, "sensors");
  EXPECT_EQ(sensors.type, SourceType::Exec);
  EXPECT_EQ(sensors.command, (std::vector<std::string>{"/usr/local/bin/read-sensors", "--json"}));
  EXPECT_EQ(sensors.interval, 1min);
  EXPECT_EQ(sensors.timeout, 5s);
  const SourceConfig& host = c.sources[2];
  EXPECT_EQ(host.type, SourceType::System);
  EXPECT_EQ(host.interval, 10s);
  EXPECT_EQ(host.metrics, (std::vector<std::string>{"cpu", "memory", "disk"}));
  EXPECT_EQ(host.disk_path, "/var");

  EXPECT_EQ(c.queue.max_size, 16ull << 20);
  EXPECT_EQ(c.queue.max_age, 48h);
  EXPECT_EQ(c.queue.order, DrainOrder::NewestFirst);
  EXPECT_DOUBLE_EQ(c.queue.drain_rate, 50);
  EXPECT_EQ(c.delivery.max_batch_size, 4096u);
  EXPECT_EQ(c.delivery.flush_interval, 250ms);
  EXPECT_EQ(c.delivery.backoff_initial, 2s);
  EXPECT_EQ(c.delivery.backoff_max, 10min);
  EXPECT_EQ(c.delivery.shutdown_timeout, 3s);
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
  EXPECT_EQ(r.config->sources[0].scale, 1.0);
  EXPECT_EQ(r.config->sources[0].offset, 0.0);
  EXPECT_EQ(r.config->sources[1].interval, 500ms);
  EXPECT_EQ(r.config->sources[1].timeout, 200ms);
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
             "queue.drain_rate: must be from 0");
  expect_one("server:\n  host: h\nqueue:\n  drain_rate: fast\n", 4, 15, "must be a number");
  expect_one("server:\n  host: h\nqueue:\n  max_size: -5MiB\n", 4, 13, "negative");
  expect_one("server:\n  host: h\nqueue:\n  order: random\n", 4, 10, "oldest_first, newest_first");
  expect_one("server:\n  host: h\nlogging:\n  level: verbose\n", 4, 10,
             "trace, debug, info, warning, error");
  expect_one("server:\n  host: h\ndbus:\n  bus: user\n", 4, 8, "system, session, none");
}

TEST(Errors, DeliveryLimits) {
  expect_one("server: {host: h}\ndelivery:\n  max_batch_size: 63\n", 3, 19, "from 64 B to 1.0 MiB");
  expect_one("server: {host: h}\ndelivery:\n  max_batch_size: 1025KiB\n", 3, 19, "from 64 B");
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
             "max_response_size)");
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
            "state_dir, sources, queue, delivery, dbus, logging)");
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
             "disk, temperature)");
  expect_one(head + "  - name: a\n    type: system\n    metrics: [cpu, cpu]\n", 5, 20,
             "sources[0].metrics[1]: 'cpu' is listed twice");
  expect_one(head + "  - name: a\n    type: system\n    metrics: []\n", 5, 14,
             "sources[0].metrics: expected a non-empty list");
  expect_one(head + "  - name: a\n    type: system\n    disk_path: var\n", 5, 16,
             "must be an absolute path");
  expect_one(head + "  - name: a\n    type: system\n    key: k\n", 5, 5,
             "sources[0].key: only file sources have this key, not system sources");
  // Keys that belong to the unsupported type are not piled on top.
  expect_one(head + "  - name: a\n    type: plugin\n    path: /x.so\n    options: {a: 1}\n", 4, 11,
             "source type 'plugin' is not supported by this build yet");
  expect_one(head + "  - name: a\n    type: fiel\n", 4, 11,
             "unknown source type 'fiel' (use file, exec or system)");
  expect_one(head + "  - name: a\n    path: /x\n", 3, 5, "sources[0]: missing required key 'type'");
  expect_one(head + "  - type: exec\n    command: [x]\n", 3, 5,
             "sources[0]: missing required key 'name'");
  expect_one(head + "  - {name: a, type: file, key: k}\n", 3, 5, "missing required key 'path'");
  expect_one(head + "  - {name: a, type: file, path: /x}\n", 3, 5, "missing required key 'key'");
  expect_one(head + "  - {name: a, type: exec}\n", 3, 5, "missing required key 'command'");
  expect_one(head + "  - name: a\n    type: file\n    path: /x\n    key: k\n    command: [x]\n", 7,
             5, "sources[0].command: only exec sources have this key, not file sources");
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
    auto r = tb::config::load_string(
        head + "  - name: a\n    type: exec\n    command: [x]\n    interval: 2s\n", "t.yaml");
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r.config->sources[0].timeout, tb::Millis(2000));
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
  EXPECT_THAT(text, HasSubstr("credentials: unknown key (known keys: access_token)"));
}

}  // namespace
}  // namespace tb::config
