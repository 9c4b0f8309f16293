// A stand-in owner of io.tbagent.Agent1 for tests/integration/test_dbus_policy.py: serves the
// real StatusService with a fixed status on the system bus (DBUS_SYSTEM_BUS_ADDRESS), so the bus
// policy can be tested without the whole agent. Prints "ready" once the name is owned,
// "flush called"/"reload called" per method call; exits 0 on SIGTERM/SIGINT, 1 when the name
// cannot be owned (the policy test uses that too).
#include <signal.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>
#include <systemd/sd-event.h>

#include <cstdio>
#include <string>

#include "dbus/status_service.hpp"

int main() {
  // stdout carries only the protocol lines the test reads; logs go to stderr.
  spdlog::set_default_logger(spdlog::stderr_logger_st("fixture"));
  sd_event* loop = nullptr;
  if (sd_event_default(&loop) < 0) return 1;
  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGTERM);
  sigaddset(&mask, SIGINT);
  sigprocmask(SIG_BLOCK, &mask, nullptr);
  sd_event_add_signal(loop, nullptr, SIGTERM, nullptr, nullptr);
  sd_event_add_signal(loop, nullptr, SIGINT, nullptr, nullptr);

  tb::dbus::Status status;
  status.state = "running";
  status.device_name = "fixture-device";
  status.provisioned = true;
  status.server = "127.0.0.1:5683";
  status.queued_readings = 3;
  status.sent_readings = 42;
  status.dropped_readings = 1;
  status.last_success_time = 1700000000000000;
  status.last_error = "";
  status.sources = {{"room", "file", 30000000, 10, 0, 1700000000000000, ""}};
  status.status_text = "running: 42 reading(s) delivered";

  int rc = 0;
  tb::dbus::Handlers h;
  h.flush = [] {
    std::printf("flush called\n");
    std::fflush(stdout);
  };
  h.reload = [] {
    std::printf("reload called\n");
    std::fflush(stdout);
    return std::string();
  };
  h.name_result = [&](bool owned, const std::string& err) {
    if (owned) {
      std::printf("ready\n");
    } else {
      std::printf("not owned: %s\n", err.c_str());
      rc = 1;
      sd_event_exit(loop, 1);
    }
    std::fflush(stdout);
  };
  std::string err;
  auto service = tb::dbus::StatusService::create(
      loop, tb::config::BusKind::System, [&] { return status; }, std::move(h), &err);
  if (!service) {
    std::fprintf(stderr, "cannot start: %s\n", err.c_str());
    return 1;
  }
  sd_event_loop(loop);
  service.reset();
  sd_event_unref(loop);
  return rc;
}
