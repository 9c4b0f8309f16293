// The downlink's pure parts: attribute and RPC codecs, remote settings, and the config keys
// (docs/attributes.md).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>

#include "attributes/codec.hpp"
#include "config/config.hpp"
#include "rpc/codec.hpp"
#include "sources/exec_source.hpp"
#include "sources/source_type.hpp"
#include "sources/system_source.hpp"

namespace {

using nlohmann::json;
using namespace tb;
using namespace std::chrono_literals;

TEST(AttributesCodec, NestingDepthSkipsStrings) {
  EXPECT_EQ(attributes::nesting_depth(R"({"a":"[[[[{{{{"})"), 1);
  EXPECT_EQ(attributes::nesting_depth(R"({"a":[[1]],"b":"\"[["})"), 3);
  EXPECT_EQ(attributes::nesting_depth("1"), 0);
}

TEST(AttributesCodec, NotificationsCarryChangesAndDeletions) {
  std::string error;
  auto u = attributes::parse_notification(R"({"a":1,"b":"x"})", &error);
  ASSERT_TRUE(u) << error;
  EXPECT_EQ(u->values.size(), 2u);
  EXPECT_EQ(u->values["a"], 1);
  EXPECT_TRUE(u->deleted.empty());
  u = attributes::parse_notification(R"({"deleted":["a","b"],"c":true})", &error);
  ASSERT_TRUE(u) << error;
  EXPECT_EQ(u->deleted, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(u->values.size(), 1u);
}

TEST(AttributesCodec, HostileNotificationsAreRefusedWhole) {
  std::string error;
  for (const std::string& bad : std::vector<std::string>{
           "", "[1,2]", "\"x\"", "{", R"({"deleted":"a"})", R"({"deleted":[1]})",
           "{\"a\":" + std::string(20, '[') + std::string(20, ']') + "}",
           "{\"a\":\"" + std::string(20000, 'x') + "\"}"}) {
    error.clear();
    EXPECT_FALSE(attributes::parse_notification(bad, &error)) << bad.substr(0, 40);
    EXPECT_FALSE(error.empty());
  }
  json many = json::object();
  for (int i = 0; i < 300; ++i) many["k" + std::to_string(i)] = i;
  EXPECT_FALSE(attributes::parse_notification(many.dump(), &error));
}

TEST(AttributesCodec, GetAnswerGivesTheSharedPart) {
  std::string error;
  auto u = attributes::parse_get_answer(R"({"client":{"x":1},"shared":{"a":"5s"}})", &error);
  ASSERT_TRUE(u) << error;
  EXPECT_EQ(u->values.size(), 1u);
  EXPECT_EQ(u->values["a"], "5s");
  u = attributes::parse_get_answer(R"({"client":{"x":1}})", &error);
  ASSERT_TRUE(u);
  EXPECT_TRUE(u->values.empty());
  EXPECT_FALSE(attributes::parse_get_answer(R"({"shared":[1]})", &error));
}

TEST(AttributesCodec, ClientAttributesAndWhatChanged) {
  attributes::Facts f;
  f.agent_version = "1.2.3";
  f.hostname = "gw";
  f.sources = {{"host", 30s}, {"modem", Millis(0)}};
  config::Value statics;
  statics.data = config::Value::Map{{"site", config::Value{std::string("plant-3")}},
                                    {"hostname", config::Value{std::string("override")}}};
  const json a = attributes::client_attributes(f, statics);
  EXPECT_EQ(a["agent_version"], "1.2.3");
  EXPECT_EQ(a["site"], "plant-3");
  EXPECT_EQ(a["hostname"], "override");
  EXPECT_EQ(a["sources"], json({{"host", "30s"}, {"modem", nullptr}}));
  EXPECT_EQ(attributes::changed_attributes(a, a), json::object());
  json b = a;
  b["site"] = "plant-4";
  EXPECT_EQ(attributes::changed_attributes(a, b), json({{"site", "plant-4"}}));
  EXPECT_EQ(attributes::changed_attributes(json::object(), a), a);
}

config::Config with_sources() {
  config::Config c;
  config::SourceConfig host;
  host.name = "host";
  host.type = "system";
  host.settings = std::make_shared<sources::SystemSettings>();
  config::SourceConfig script;
  script.name = "script";
  script.type = "exec";
  auto program = std::make_shared<sources::ProgramSettings>();
  program->timeout = 5s;
  script.settings = std::move(program);
  c.sources = {host, script};
  return c;
}

TEST(RemoteSettings, AllowedValuesApplyAndOthersAreRefused) {
  config::Config c = with_sources();
  EXPECT_EQ(attributes::apply_setting(c, "sources.host.interval", "10s"), "");
  EXPECT_EQ(c.sources[0].interval, 10s);
  EXPECT_EQ(attributes::apply_setting(c, "sources.host.interval", 2.5), "");
  EXPECT_EQ(c.sources[0].interval, 2500ms);
  EXPECT_EQ(attributes::apply_setting(c, "log_level", "debug"), "");
  EXPECT_EQ(c.logging.level, "debug");
  const config::Config before = c;
  EXPECT_NE(attributes::apply_setting(c, "log_level", "loud"), "");
  EXPECT_NE(attributes::apply_setting(c, "log_level", 3), "");
  EXPECT_NE(attributes::apply_setting(c, "sources.host.interval", json::object()), "");
  EXPECT_NE(attributes::apply_setting(c, "sources.host.interval", "10ms"), "");
  EXPECT_NE(attributes::apply_setting(c, "sources.host.interval", -1), "");
  EXPECT_NE(attributes::apply_setting(c, "sources.nope.interval", "10s"), "");
  EXPECT_NE(attributes::apply_setting(c, "sources.script.interval", "1s"), "");  // < timeout
  EXPECT_NE(attributes::apply_setting(c, "server.host", "evil"), "");
  EXPECT_EQ(c.sources[0].interval, before.sources[0].interval);
  EXPECT_EQ(c.logging.level, before.logging.level);
  EXPECT_EQ(c.server.host, before.server.host);
}

TEST(RpcCodec, IdIsANumberOrANumericString) {
  std::string error;
  auto r = rpc::parse_request(R"({"id":7,"method":"getStatus","params":null})", &error);
  ASSERT_TRUE(r) << error;
  EXPECT_EQ(r->id, 7);
  EXPECT_EQ(r->method, "getStatus");
  r = rpc::parse_request(R"({"id":"12","method":"m","params":{"a":[1]}})", &error);
  ASSERT_TRUE(r) << error;
  EXPECT_EQ(r->id, 12);
  EXPECT_EQ(r->params, json({{"a", {1}}}));
  r = rpc::parse_request(R"({"id":0,"method":"m"})", &error);
  ASSERT_TRUE(r);
  EXPECT_TRUE(r->params.is_null());
  for (const char* bad : {R"({"id":-1,"method":"m"})", R"({"id":"x1","method":"m"})",
                          R"({"id":1.5,"method":"m"})", R"({"method":"m"})", R"({"id":1})",
                          R"({"id":1,"method":""})", R"({"id":1,"method":7})", "[]", "nope"}) {
    EXPECT_FALSE(rpc::parse_request(bad, &error)) << bad;
  }
  EXPECT_FALSE(rpc::parse_request(
      "{\"id\":1,\"method\":\"m\",\"params\":" + std::string(30, '[') + std::string(30, ']') + "}",
      &error));
}

TEST(RpcCodec, KeyTellsRequestsApart) {
  rpc::Request a{1, "m", json{{"x", 1}}}, b{1, "m", json{{"x", 2}}}, c{2, "m", json{{"x", 1}}};
  EXPECT_NE(rpc::request_key(a), rpc::request_key(b));
  EXPECT_NE(rpc::request_key(a), rpc::request_key(c));
  EXPECT_EQ(rpc::request_key(a), rpc::request_key(rpc::Request{1, "m", json{{"x", 1}}}));
  EXPECT_EQ(json::parse(rpc::error_reply("unknown method 'x'")),
            json({{"error", "unknown method 'x'"}}));
}

TEST(DownlinkConfig, KeysAreParsedAndCheckedAtLoad) {
  auto r = config::load_string(R"(
server: {host: tb.example.com}
sources:
  - {name: host, type: system, interval: 30s}
attributes: {site: plant-3, floor: 2}
remote: {host_interval: sources.host.interval, lvl: log_level}
rpc:
  restart_modem: {command: [/usr/sbin/restart-modem, now], timeout: 30s}
downlink: {reregister_interval: 1m}
)",
                               "t.yaml", sources::source_types());
  ASSERT_TRUE(r.ok()) << (r.diagnostics.empty() ? "" : r.diagnostics[0].to_string());
  const auto& d = r.config->downlink;
  EXPECT_EQ(d.remote.at("host_interval"), "sources.host.interval");
  EXPECT_EQ(d.rpc.at("restart_modem").command,
            (std::vector<std::string>{"/usr/sbin/restart-modem", "now"}));
  EXPECT_EQ(d.rpc.at("restart_modem").timeout, 30s);
  EXPECT_EQ(d.reregister_interval, 1min);
  ASSERT_TRUE(std::holds_alternative<config::Value::Map>(d.attributes.data));

  for (const char* bad : {"remote: {x: server.host}\n", "remote: {x: credentials.access_token}\n",
                          "rpc: {getStatus: {command: [/bin/true]}}\n", "rpc: {m: {timeout: 1s}}\n",
                          "rpc: {m: {command: /bin/true}}\n", "attributes: [1, 2]\n",
                          "downlink: {reregister_interval: 1s}\n"}) {
    auto b = config::load_string(std::string("server: {host: h}\n") + bad, "t.yaml",
                                 sources::source_types());
    EXPECT_FALSE(b.ok()) << bad;
  }
}

// An RPC method's command is read by the same reader as an exec source's (config::program_argv):
// the same messages, at the element's own position.
TEST(DownlinkConfig, RpcCommandIsReadLikeAnExecSourcesCommand) {
  const auto rpc = config::load_string("server: {host: h}\nrpc:\n  m:\n    command: [\"\", [x]]\n",
                                       "t.yaml", sources::source_types());
  const auto exec = config::load_string(
      "server: {host: h}\nsources:\n  - {name: s, type: exec, command: [\"\", [x]]}\n", "t.yaml",
      sources::source_types());
  ASSERT_EQ(rpc.diagnostics.size(), 2u);
  ASSERT_EQ(exec.diagnostics.size(), 2u);
  EXPECT_EQ(rpc.diagnostics[0].to_string(),
            "t.yaml:4:15: rpc.m.command[0]: the program must not be empty");
  EXPECT_EQ(rpc.diagnostics[1].to_string(),
            "t.yaml:4:19: rpc.m.command[1]: expected a string, not a list");
  for (std::size_t i = 0; i < 2; ++i) {
    const std::string r = rpc.diagnostics[i].message, e = exec.diagnostics[i].message;
    EXPECT_EQ(r.substr(r.find(": ")), e.substr(e.find(": "))) << i;
  }
}

}  // namespace
