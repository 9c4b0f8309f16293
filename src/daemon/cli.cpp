#include "daemon/cli.hpp"

#include <signal.h>
#include <sys/stat.h>

#include <spdlog/spdlog.h>
#include <CLI/CLI.hpp>

#include <cstdio>
#include <iostream>
#include <map>

#include "config/config.hpp"
#include "daemon/manager.hpp"
#include "sources/source.hpp"
#include "telemetry/record.hpp"
#include "util/log.hpp"

#ifndef TB_AGENT_VERSION
#define TB_AGENT_VERSION "0.0.0"
#endif

namespace tb::daemon {

namespace {

struct Args {
  std::string config_path = "/etc/tb-agent.yaml";
  bool check_config = false;
  bool test = false;
  bool version = false;
  std::string log_target = "auto";
  Overrides overrides;
};

std::optional<config::Config> load_or_report(const Args& args, int* exit_code) {
  auto result = config::load_file(args.config_path);
  if (!result.ok()) {
    for (const auto& d : result.diagnostics) std::cout << d.to_string() << "\n";
    std::cout.flush();
    *exit_code = kExitConfig;
    return std::nullopt;
  }
  apply_overrides(*result.config, args.overrides);
  return std::move(result.config);
}

// --check-config: parse, validate, and build (not start) every source, so a source the factory
// refuses fails here rather than at start-up. No network, no state.
int check_config(const Args& args) {
  int code = kExitOk;
  auto cfg = load_or_report(args, &code);
  if (!cfg) return code;
  sd_event* loop = nullptr;
  if (sd_event_new(&loop) < 0) return kExitFailure;
  bool ok = true;
  for (const auto& sc : cfg->sources) {
    std::string err;
    if (!sources::make_source(loop, sc, &err)) {
      std::cout << cfg->file.string() << ":" << sc.position.line << ":" << sc.position.column
                << ": source '" << sc.name << "': " << err << "\n";
      ok = false;
    }
  }
  sd_event_unref(loop);
  if (!ok) return kExitConfig;
  std::cout << "OK\n";
  return kExitOk;
}

// --test: collect every source once and print the batch that would be sent. No network, no state.
int test_sources(const Args& args) {
  int code = kExitOk;
  auto cfg = load_or_report(args, &code);
  if (!cfg) return code;
  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGCHLD);  // exec sources watch their child through sd_event_add_child
  sigprocmask(SIG_BLOCK, &mask, nullptr);
  sd_event* loop = nullptr;
  if (sd_event_new(&loop) < 0) return kExitFailure;

  std::vector<sources::SourcePtr> srcs;
  std::map<std::size_t, telemetry::Record> records;
  std::size_t pending = 0;
  bool failed = false;
  for (const auto& sc : cfg->sources) {
    std::string err;
    auto s = sources::make_source(loop, sc, &err);
    if (!s) {
      std::cerr << "source '" << sc.name << "': " << err << "\n";
      failed = true;
      continue;
    }
    srcs.push_back(std::move(s));
  }
  for (std::size_t i = 0; i < srcs.size(); ++i) {
    ++pending;
    srcs[i]->collect([&, i](sources::Collected c) {
      if (c.record) {
        records[i] = std::move(*c.record);
      } else {
        std::cerr << "source '" << srcs[i]->config().name << "': " << c.error << "\n";
        failed = true;
      }
      if (--pending == 0) sd_event_exit(loop, 0);
    });
  }
  if (pending > 0) sd_event_loop(loop);
  std::vector<telemetry::Record> out;
  for (auto& [i, r] : records) out.push_back(std::move(r));
  std::cout << telemetry::encode_records(out) << std::endl;
  srcs.clear();
  sd_event_unref(loop);
  return failed ? kExitFailure : kExitOk;
}

}  // namespace

int cli_main(int argc, char** argv) {
  // A closed stdout/stderr pipe (`tb-agent | head`, a log reader that went away) must be a
  // failed write, not death by SIGPIPE before the last flush. Ignored before anything is written.
  ::signal(SIGPIPE, SIG_IGN);
  // Every file the agent creates (queue.db and its -wal/-shm, temporary files) is for its own
  // user only, whatever umask it was started with; systemd's UMask= in the unit says the same.
  ::umask(0077);
  Args args;
  CLI::App app{"tb-agent: a ThingsBoard device agent over CoAP", "tb-agent"};
  app.set_version_flag("--version", std::string("tb-agent ") + TB_AGENT_VERSION);
  app.add_option("-c,--config", args.config_path, "configuration file")->capture_default_str();
  auto* check = app.add_flag("--check-config", args.check_config,
                             "validate the configuration, print OK or every problem, exit 0 or 78");
  auto* test = app.add_flag("--test", args.test,
                            "collect every source once and print the telemetry JSON; no network");
  check->excludes(test);
  app.add_option_function<std::string>(
      "--state-dir", [&](const std::string& v) { args.overrides.state_dir = v; },
      "override state_dir from the configuration");
  app.add_option_function<std::string>(
         "--log-level", [&](const std::string& v) { args.overrides.log_level = v; },
         "trace, debug, info, warning, error (overrides logging.level)")
      ->check(CLI::IsMember({"trace", "debug", "info", "warning", "error", "critical", "off"}));
  app.add_option("--log-target", args.log_target, "auto (journal under systemd), journal, stderr")
      ->check(CLI::IsMember({"auto", "journal", "stderr"}))
      ->capture_default_str();
  app.footer(
      "Exit status: 0 clean stop, 78 invalid configuration, 1 any other fatal error.\n"
      "See tb-agent(8); every configuration key: configuration.md in the documentation.");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // Usage errors are configuration errors of the invocation: EX_USAGE would be 64, but the
    // contract names only 0/78/1, so they are 1 (and --help/--version are 0).
    const int r = app.exit(e);
    return r == 0 ? kExitOk : kExitFailure;
  }

  const log::Target target = args.log_target == "journal"  ? log::Target::Journal
                             : args.log_target == "stderr" ? log::Target::Stderr
                                                           : log::Target::Auto;
  log::setup(args.overrides.log_level.value_or("info"), target);

  try {
    if (args.check_config) return check_config(args);
    if (args.test) return test_sources(args);
    int code = kExitOk;
    auto cfg = load_or_report(args, &code);
    if (!cfg) {
      spdlog::critical("invalid configuration {}; not starting", args.config_path);
      return code;
    }
    log::set_level(cfg->logging.level);
    Manager manager(std::move(*cfg), args.overrides);
    return manager.run();
  } catch (const std::exception& e) {
    spdlog::critical("fatal: {}", e.what());
    return kExitFailure;
  }
}

}  // namespace tb::daemon
