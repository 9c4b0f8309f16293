#include "daemon/cli.hpp"

#include <signal.h>
#include <sys/stat.h>

#include <spdlog/spdlog.h>
#include <CLI/CLI.hpp>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <map>

#include "config/config.hpp"
#include "daemon/manager.hpp"
#include "daemon/status_report.hpp"
#include "dbus/status_client.hpp"
#include "sources/source.hpp"
#include "sources/source_type.hpp"
#include "telemetry/record.hpp"
#include "util/clock.hpp"
#include "util/log.hpp"

#ifndef TB_AGENT_VERSION
#define TB_AGENT_VERSION "0.0.0"
#endif

namespace tb::daemon {

namespace {

// `tb-agent status` exits 3 when no agent answers, as `systemctl status` does for a unit that
// is not active (docs/interface.md).
constexpr int kExitNotRunning = 3;

struct Args {
  std::string config_path = "/etc/tb-agent.yaml";
  bool check_config = false;
  bool test = false;
  bool version = false;
  std::string log_target = "auto";
  Overrides overrides;
  // status / reload
  std::string bus;  // "" = the config's dbus.bus (system when the config cannot be read)
  bool json = false;
  pid_t pid = 0;
  double timeout_s = 30;
};

// Which bus the agent serves on: --bus, else the config's dbus.bus. A config this user cannot
// read (it may hold secrets) or that does not load means the default, the system bus.
config::BusKind bus_of(const Args& args, const std::optional<config::Config>& cfg) {
  if (args.bus == "system") return config::BusKind::System;
  if (args.bus == "session") return config::BusKind::Session;
  return cfg ? cfg->dbus.bus : config::BusKind::System;
}

std::optional<config::Config> load_quietly(const Args& args) {
  auto result = config::load_file(args.config_path, sources::source_types());
  if (!result.ok()) return std::nullopt;
  return std::move(result.config);
}

// tb-agent status [--json]: one GetAll over D-Bus, printed for a person or a script.
int status(const Args& args) {
  const auto kind = bus_of(args, load_quietly(args));
  dbus::Status st;
  std::string err;
  switch (dbus::read_status(kind, &st, &err)) {
    case dbus::CallResult::Ok:
      break;
    case dbus::CallResult::NoAgent:
      std::cerr << "tb-agent is not running, or cannot be asked: " << err << "\n";
      return kExitNotRunning;
    default:
      std::cerr << "cannot read the agent's status: " << err << "\n";
      return kExitFailure;
  }
  if (args.json)
    std::cout << format_status_json(st, wall_us()) << std::endl;
  else
    std::cout << format_status(st, wall_us()) << std::flush;
  return kExitOk;
}

std::optional<config::Config> load_or_report(const Args& args, int* exit_code) {
  auto result = config::load_file(args.config_path, sources::source_types());
  if (!result.ok()) {
    for (const auto& d : result.diagnostics) std::cout << d.to_string() << "\n";
    std::cout.flush();
    *exit_code = kExitConfig;
    return std::nullopt;
  }
  apply_overrides(*result.config, args.overrides);
  return std::move(result.config);
}

// Builds (not starts) every source, so a source the factory refuses fails before start-up;
// prints each problem as PATH:LINE:COL: message. False on any problem.
bool sources_build(const config::Config& cfg, std::ostream& out) {
  sd_event* loop = nullptr;
  if (sd_event_new(&loop) < 0) return false;
  bool ok = true;
  for (const auto& sc : cfg.sources) {
    std::string err;
    if (!sources::make_source(loop, sc, &err)) {
      out << cfg.file.string() << ":" << sc.position.line << ":" << sc.position.column
          << ": source '" << sc.name << "': " << err << "\n";
      ok = false;
    }
  }
  sd_event_unref(loop);
  return ok;
}

// tb-agent reload: asks the running agent to reload over D-Bus and waits for its answer, so
// `systemctl reload` fails when the agent refuses the file (ExecReload= in the unit). Without a
// bus (dbus.bus: none, or the bus is down) it validates the file itself and sends SIGHUP to
// --pid: the agent then applies it on its own and only its log tells whether it did.
int reload(const Args& args) {
  const auto cfg = load_quietly(args);
  const auto kind = bus_of(args, cfg);
  std::string err;
  const auto timeout = std::chrono::milliseconds(static_cast<std::int64_t>(args.timeout_s * 1000));
  const auto result = kind == config::BusKind::None ? dbus::CallResult::NoAgent
                                                    : dbus::call_reload(kind, &err, timeout);
  switch (result) {
    case dbus::CallResult::Ok:
      std::cout << "reloaded " << (cfg ? cfg->file.string() : args.config_path) << "\n";
      return kExitOk;
    case dbus::CallResult::Refused:
      std::cerr << "reload refused, the agent keeps its previous configuration:\n" << err << "\n";
      return kExitConfig;
    case dbus::CallResult::Failed:
      std::cerr << "reload failed: " << err << "\n";
      return kExitFailure;
    case dbus::CallResult::NoAgent:
      break;
  }
  if (kind != config::BusKind::None) std::cerr << "no answer on D-Bus (" << err << ")\n";
  if (args.pid <= 0) {
    std::cerr << "no agent to reload (give --pid to signal it without D-Bus)\n";
    return kExitNotRunning;
  }
  // The same checks the agent makes, so a broken file still fails the reload.
  int code = kExitOk;
  const auto checked = load_or_report(args, &code);
  if (!checked) return code;
  if (!sources_build(*checked, std::cout)) return kExitConfig;
  if (kill(args.pid, SIGHUP) != 0) {
    std::cerr << "cannot signal process " << args.pid << ": " << std::strerror(errno) << "\n";
    return kExitFailure;
  }
  std::cout << "configuration valid; sent SIGHUP to " << args.pid
            << " (without D-Bus the agent's log tells whether it applied it)\n";
  return kExitOk;
}

// --check-config: parse, validate, and build (not start) every source, so a source the factory
// refuses fails here rather than at start-up. No network, no state.
int check_config(const Args& args) {
  int code = kExitOk;
  auto cfg = load_or_report(args, &code);
  if (!cfg) return code;
  if (!sources_build(*cfg, std::cout)) return kExitConfig;
  if (const auto problem = check_transport_files(cfg->server); !problem.empty()) {
    std::cout << cfg->file.string() << ": " << problem << "\n";
    return kExitConfig;
  }
  std::cout << "OK\n";
  // Valid, but the agent will have nothing to get credentials with unless some are stored: it
  // then starts and idles in state `unconfigured` (stdout stays the contract's "OK").
  if (!cfg->provisioning.present && !cfg->credentials.configured())
    std::cerr << "note: neither provisioning nor credentials.access_token is set: unless "
              << (cfg->state_dir / "credentials.json").string()
              << " exists, the agent idles unconfigured until they are set and it is reloaded\n";
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
  const auto bus_check = CLI::IsMember({"system", "session"});
  auto* status_cmd = app.add_subcommand(
      "status", "ask the running agent over D-Bus how it is; exit 3 when no agent answers");
  status_cmd->add_flag("--json", args.json, "print one JSON object instead of the summary");
  status_cmd->add_option("--bus", args.bus, "system or session (default: the config's dbus.bus)")
      ->check(bus_check);
  // `tb-agent status --config PATH` as well as `tb-agent --config PATH status`.
  status_cmd->fallthrough();
  auto* reload_cmd = app.add_subcommand(
      "reload",
      "ask the running agent to reload its configuration and wait for the answer; exit 78 when "
      "it refuses the file");
  reload_cmd->add_option("--bus", args.bus, "system or session (default: the config's dbus.bus)")
      ->check(bus_check);
  reload_cmd->add_option("--pid", args.pid,
                         "without D-Bus: check the config, then send SIGHUP to this process");
  reload_cmd->add_option("--timeout", args.timeout_s, "seconds to wait for the agent's answer")
      ->check(CLI::Range(0.1, 600.0))
      ->capture_default_str();
  reload_cmd->fallthrough();
  app.require_subcommand(0, 1);
  status_cmd->excludes(check);
  status_cmd->excludes(test);
  reload_cmd->excludes(check);
  reload_cmd->excludes(test);
  app.footer(
      "Exit status: 0 clean stop, 78 invalid configuration, 1 any other fatal error;\n"
      "status: 0 answered, 3 no agent running; reload: 0 applied, 78 refused, 3 no agent.\n"
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
    if (status_cmd->parsed()) return status(args);
    if (reload_cmd->parsed()) return reload(args);
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
