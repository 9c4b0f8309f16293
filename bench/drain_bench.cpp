// Drain benchmark (issue 3): a backlog of N readings in the durable queue, delivered to
// tb-test-server on loopback. Two runs, each on a fresh backlog:
//
//  1. "library": the agent's delivery path alone, in this process (Queue → Uploader →
//     coap::Client on sd-event) — what delivery itself costs.
//  2. "agent": the real tb-agent binary, started on that backlog with a config like a user's (a
//     file source, D-Bus status on a private bus when dbus-daemon is installed), until the server
//     has every reading, then stopped with SIGTERM — what a user sees in top.
//
// Prints readings/s, CPU seconds and peak RSS (VmHWM) of the draining process, and with --smaps
// where its resident memory is, per mapped file.
//
//   tb-bench-drain [--readings N] [--per-record K] [--batch BYTES] [--server PATH]
//                  [--agent PATH] [--only library|agent] [--smaps] [--max-in-flight N]
//                  [--proxy 'UDP_PROXY_ARGS']
//
// --proxy puts tests/tools/udp_proxy.py between the drain and the server, with those arguments
// (e.g. '--delay 10 --loss 1': 20 ms round trip, 1 % loss each way). TB_BENCH_STATS=1 prints the
// server's counters after the agent run (duplicates show retransmissions).
//
// Backlogs are written by a forked child, so the figures printed are the drain's alone.
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <spdlog/spdlog.h>

#include "coap/client.hpp"
#include "daemon/uploader.hpp"
#include "telemetry/queue.hpp"

namespace fs = std::filesystem;
using namespace tb;

namespace {

struct Args {
  std::uint64_t readings = 100000;
  unsigned per_record = 5;
  std::uint64_t batch = 1024;
  std::string server = TB_TEST_SERVER_PATH;
  std::string agent = TB_AGENT_PATH;
  bool smaps = false;
  unsigned max_in_flight = config::DeliveryConfig{}.max_in_flight;
  std::string proxy_args;  // empty: no proxy
  std::string proxy = TB_UDP_PROXY_PATH;
};

double cpu_seconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

// One "Name:   123 kB" field of a /proc/self file, in KiB; -1 if absent.
long proc_kib(const char* file, const char* field) {
  FILE* f = std::fopen(file, "r");
  if (!f) return -1;
  char line[256];
  long v = -1;
  const std::size_t n = std::strlen(field);
  while (std::fgets(line, sizeof line, f)) {
    if (std::strncmp(line, field, n) == 0 && line[n] == ':') {
      v = std::strtol(line + n + 1, nullptr, 10);
      break;
    }
  }
  std::fclose(f);
  return v;
}

// Resident KiB per mapped file (and [anon]/[heap]/[stack]), largest first: where the RSS is.
void print_smaps(const std::string& file) {
  FILE* f = std::fopen(file.c_str(), "r");
  if (!f) return;
  std::vector<std::pair<std::string, long>> by_name;
  std::string current;
  char line[512];
  while (std::fgets(line, sizeof line, f)) {
    unsigned long lo = 0, hi = 0;
    char name[400] = {};
    // A mapping's header is "lo-hi perms offset dev inode [name]"; its fields are "Name: value".
    if (std::sscanf(line, "%lx-%lx %*s %*s %*s %*s %399s", &lo, &hi, name) >= 2) {
      current = name[0] ? name : "[anon]";
      continue;
    }
    if (std::strncmp(line, "Rss:", 4) == 0) {
      const long kib = std::strtol(line + 4, nullptr, 10);
      auto it = std::find_if(by_name.begin(), by_name.end(),
                             [&](const auto& e) { return e.first == current; });
      if (it == by_name.end())
        by_name.emplace_back(current, kib);
      else
        it->second += kib;
    }
  }
  std::fclose(f);
  std::sort(by_name.begin(), by_name.end(),
            [](const auto& x, const auto& y) { return x.second > y.second; });
  for (const auto& [name, kib] : by_name)
    if (kib > 0) std::printf("  %6ld KiB  %s\n", kib, name.c_str());
}

int fill(const fs::path& dir, const Args& a) {
  std::string warn, err;
  config::QueueConfig qc;
  qc.max_size = 1ull << 30;
  auto q = telemetry::Queue::open(dir, qc, &warn, &err);
  if (!q) {
    std::fprintf(stderr, "open: %s\n", err.c_str());
    return 1;
  }
  const std::int64_t ts0 = 1700000000000;
  for (std::uint64_t i = 0; i < a.readings / a.per_record; ++i) {
    telemetry::Record r;
    r.ts_ms = ts0 + static_cast<std::int64_t>(i);
    r.source = "bench";
    for (unsigned k = 0; k < a.per_record; ++k)
      r.readings.push_back({"k" + std::to_string(k), static_cast<double>(i % 1000) + 0.25 * k});
    if (!q->push(r, &err)) {
      std::fprintf(stderr, "push: %s\n", err.c_str());
      return 1;
    }
  }
  return 0;
}

struct Server {
  pid_t pid = -1;
  std::uint16_t port = 0;
  FILE* control = nullptr;  // its stdin: control commands
  FILE* replies = nullptr;  // its stdout: the port line, then one reply per command

  // One control command, its one-line reply.
  std::string ask(const char* cmd) {
    std::fprintf(control, "%s\n", cmd);
    std::fflush(control);
    char line[4096] = {};
    if (!std::fgets(line, sizeof line, replies)) return {};
    return line;
  }
  std::uint64_t counter(const char* name) {
    const std::string stats = ask("stats");
    const std::string field = std::string("\"") + name + "\":";
    const auto at = stats.find(field);
    return at == std::string::npos ? 0
                                   : std::strtoull(stats.c_str() + at + field.size(), nullptr, 10);
  }
  std::uint64_t points() { return counter("points"); }
  // CPU seconds the server has used so far (utime + stime of /proc/PID/stat).
  double cpu_seconds() const {
    FILE* f = std::fopen(("/proc/" + std::to_string(pid) + "/stat").c_str(), "r");
    if (!f) return -1;
    char buf[1024] = {};
    const std::size_t n = std::fread(buf, 1, sizeof buf - 1, f);
    std::fclose(f);
    const char* p = std::strrchr(buf, ')');
    if (!p || n == 0) return -1;
    unsigned long ut = 0, st = 0;
    // Fields after the command: state ppid pgrp session tty tpgid flags minflt cminflt majflt
    // cmajflt utime stime.
    if (std::sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) != 2)
      return -1;
    return static_cast<double>(ut + st) / static_cast<double>(sysconf(_SC_CLK_TCK));
  }
  pid_t proxy_pid = -1;
  std::uint16_t target_port = 0;  // the proxy's when there is one, else the server's
  void stop() {
    if (proxy_pid > 0) {
      kill(proxy_pid, SIGTERM);
      waitpid(proxy_pid, nullptr, 0);
      proxy_pid = -1;
    }
    if (pid <= 0) return;
    kill(pid, SIGTERM);
    waitpid(pid, nullptr, 0);
    std::fclose(control);
    std::fclose(replies);
    pid = -1;
  }
};

// tb-test-server on an ephemeral loopback port, pre-provisioned with the bench device.
std::optional<Server> start_server(const Args& a, const fs::path& dir) {
  int in[2], out[2];
  if (pipe(in) != 0 || pipe(out) != 0) return std::nullopt;
  Server s;
  s.pid = fork();
  if (s.pid == 0) {
    dup2(in[0], 0);
    dup2(out[1], 1);
    close(in[1]);
    close(out[0]);
    const std::string state = (dir / "server.json").string();
    execl(a.server.c_str(), a.server.c_str(), "--port", "0", "--bind", "127.0.0.1", "--quiet",
          "--state", state.c_str(), "--record", "/dev/null", "--device", "bench=BENCHTOKEN",
          static_cast<char*>(nullptr));
    _exit(127);
  }
  close(in[0]);
  close(out[1]);
  s.control = fdopen(in[1], "w");
  s.replies = fdopen(out[0], "r");
  char line[256] = {};
  if (!s.replies || !std::fgets(line, sizeof line, s.replies)) {
    std::fprintf(stderr, "server did not start (%s)\n", a.server.c_str());
    return std::nullopt;
  }
  const char* p = std::strrchr(line, ' ');
  s.port = static_cast<std::uint16_t>(std::atoi(p ? p + 1 : line));
  s.target_port = s.port;
  if (!a.proxy_args.empty()) {
    int pout[2];
    if (pipe(pout) != 0) return std::nullopt;
    s.proxy_pid = fork();
    if (s.proxy_pid == 0) {
      dup2(pout[1], 1);
      close(pout[0]);
      const std::string cmd =
          "exec python3 " + a.proxy +
          " --listen 127.0.0.1:0 --upstream 127.0.0.1:" + std::to_string(s.port) + " " +
          a.proxy_args;
      execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
      _exit(127);
    }
    close(pout[1]);
    FILE* f = fdopen(pout[0], "r");
    char pl[256] = {};
    if (!f || !std::fgets(pl, sizeof pl, f)) {
      std::fprintf(stderr, "proxy did not start (%s)\n", a.proxy.c_str());
      return std::nullopt;
    }
    std::fclose(f);
    const char* colon = std::strrchr(pl, ':');
    s.target_port = static_cast<std::uint16_t>(std::atoi(colon ? colon + 1 : pl));
  }
  return s;
}

fs::path make_backlog(const Args& a, const char* name) {
  char tmpl[64];
  std::snprintf(tmpl, sizeof tmpl, "/tmp/tb-bench-drain-%s-XXXXXX", name);
  const fs::path dir = mkdtemp(tmpl);
  pid_t child = fork();
  if (child == 0) _exit(fill(dir, a));
  int status = 0;
  waitpid(child, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return {};
  return dir;
}

void print_result(const char* run, std::uint64_t readings, double wall, double cpu, long hwm_kib) {
  std::printf("%s: %llu readings in %.2f s wall = %.0f readings/s, %.2f CPU s, peak RSS %.1f MiB\n",
              run, static_cast<unsigned long long>(readings), wall,
              static_cast<double>(readings) / wall, cpu, static_cast<double>(hwm_kib) / 1024.0);
}

// Run 1: the delivery path in this process.
int run_library(const Args& a) {
  const fs::path dir = make_backlog(a, "library");
  if (dir.empty()) return 1;
  auto server = start_server(a, dir);
  if (!server) return 1;
  sd_event* loop = nullptr;
  sd_event_new(&loop);
  std::string warn, err;
  config::QueueConfig qc;
  qc.max_size = 1ull << 30;
  auto queue = telemetry::Queue::open(dir, qc, &warn, &err);
  auto client = coap::Client::create(loop, {"127.0.0.1", server->target_port}, {}, &err);
  if (!queue || !client) {
    std::fprintf(stderr, "setup: %s\n", err.c_str());
    return 1;
  }
  const std::uint64_t backlog = queue->queued_readings();
  config::DeliveryConfig dc;
  dc.max_batch_size = a.batch;
  dc.max_in_flight = a.max_in_flight;
  std::uint64_t requests = 0;
  daemon::Uploader::Callbacks cb;
  cb.delivered = [&](std::uint64_t) {
    ++requests;
    if (queue->queued_readings() == 0) sd_event_exit(loop, 0);
  };
  cb.state_changed = [&](const daemon::DeliveryEvent& ev) {
    if (ev.state != daemon::DeliveryState::Idle) {
      std::fprintf(stderr, "delivery failed: %s\n", ev.error.c_str());
      sd_event_exit(loop, 1);
    }
  };
  daemon::Uploader up(loop, *queue, dc, 0, cb);
  const double cpu0 = cpu_seconds();
  const auto t0 = std::chrono::steady_clock::now();
  up.start(client.get(), "BENCHTOKEN");
  const int r = sd_event_loop(loop);
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double cpu = cpu_seconds() - cpu0;

  std::printf("library: %llu requests of <= %llu bytes, %u readings per record\n",
              static_cast<unsigned long long>(requests), static_cast<unsigned long long>(a.batch),
              a.per_record);
  print_result("library", backlog, wall, cpu, proc_kib("/proc/self/status", "VmHWM"));
  std::printf(
      "library: memory now: RssAnon %ld KiB (private) + RssFile %ld KiB (libraries, binary)\n",
      proc_kib("/proc/self/status", "RssAnon"), proc_kib("/proc/self/status", "RssFile"));
  if (a.smaps) print_smaps("/proc/self/smaps");
  up.pause();
  client.reset();
  queue.reset();
  sd_event_unref(loop);
  server->stop();
  fs::remove_all(dir);
  return r < 0 ? 1 : 0;
}

// A private bus for the agent's status service, as the system bus would be; empty if
// dbus-daemon is not installed (the agent then runs with dbus.bus: none).
std::string start_private_bus(const fs::path& dir, pid_t* pid) {
  int out[2];
  if (access("/usr/bin/dbus-daemon", X_OK) != 0 || pipe(out) != 0) return {};
  *pid = fork();
  if (*pid == 0) {
    dup2(out[1], 1);
    close(out[0]);
    const std::string address = "--address=unix:path=" + (dir / "bus").string();
    execl("/usr/bin/dbus-daemon", "dbus-daemon", "--session", "--nofork", "--print-address=1",
          address.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  close(out[1]);
  char line[512] = {};
  FILE* f = fdopen(out[0], "r");
  const bool ok = f && std::fgets(line, sizeof line, f);
  if (f) std::fclose(f);
  if (!ok) return {};
  line[std::strcspn(line, "\n")] = 0;
  return line;
}

// Run 2: the real tb-agent.
int run_agent(const Args& a) {
  const fs::path dir = make_backlog(a, "agent");
  if (dir.empty()) return 1;
  auto server = start_server(a, dir);
  if (!server) return 1;
  pid_t bus_pid = -1;
  const std::string bus = start_private_bus(dir, &bus_pid);
  {
    std::ofstream creds(dir / "credentials.json");
    creds
        << R"({"credentialsType":"ACCESS_TOKEN","credentialsValue":"BENCHTOKEN","deviceName":"bench"})"
        << "\n";
    std::ofstream value(dir / "value");
    value << "21.5\n";
    std::ofstream cfg(dir / "agent.yaml");
    cfg << "server:\n  host: 127.0.0.1\n  port: " << server->target_port << "\n"
        << "device:\n  name: bench\n"
        << "state_dir: " << dir.string() << "\n"
        << "sources:\n  - name: room\n    type: file\n    path: " << (dir / "value").string()
        << "\n    key: temperature\n    interval: 1s\n"
        << "queue:\n  max_size: 1GiB\n"
        << "delivery:\n  max_batch_size: " << a.batch << "\n  max_in_flight: " << a.max_in_flight
        << "\n"
        << "dbus:\n  bus: " << (bus.empty() ? "none" : "session") << "\n"
        << "logging:\n  level: warning\n";
  }
  const std::uint64_t backlog = a.readings / a.per_record * a.per_record;
  const std::string config = (dir / "agent.yaml").string();
  const auto t0 = std::chrono::steady_clock::now();
  pid_t agent = fork();
  if (agent == 0) {
    if (!bus.empty()) setenv("DBUS_SESSION_BUS_ADDRESS", bus.c_str(), 1);
    unsetenv("NOTIFY_SOCKET");
    execl(a.agent.c_str(), a.agent.c_str(), "--config", config.c_str(),
          static_cast<char*>(nullptr));
    _exit(127);
  }
  // The server counts the readings it accepted; poll it (a bench may poll, the agent does not).
  bool done = false;
  for (int i = 0; i < 60000 && !done; ++i) {
    if (server->points() >= backlog)
      done = true;
    else
      usleep(5000);
    if (waitpid(agent, nullptr, WNOHANG) == agent) break;
  }
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const long hwm = proc_kib(("/proc/" + std::to_string(agent) + "/status").c_str(), "VmHWM");
  const long anon = proc_kib(("/proc/" + std::to_string(agent) + "/status").c_str(), "RssAnon");
  const long file = proc_kib(("/proc/" + std::to_string(agent) + "/status").c_str(), "RssFile");
  const std::uint64_t requests = server->counter("requests");
  const double server_cpu = server->cpu_seconds();
  if (std::getenv("TB_BENCH_STATS"))
    std::fprintf(stderr, "server: %s", server->ask("stats").c_str());
  if (a.smaps && done) print_smaps("/proc/" + std::to_string(agent) + "/smaps");
  kill(agent, SIGTERM);
  int status = 0;
  rusage ru{};
  wait4(agent, &status, 0, &ru);
  const double cpu = static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
                     static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
  if (bus_pid > 0) {
    kill(bus_pid, SIGTERM);
    waitpid(bus_pid, nullptr, 0);
  }
  server->stop();
  fs::remove_all(dir);
  if (!done) {
    std::fprintf(stderr, "agent: did not deliver the backlog (exit status %d)\n", status);
    return 1;
  }
  std::printf(
      "agent: %llu requests of <= %llu bytes (max %u in flight); the server used %.2f CPU s\n",
      static_cast<unsigned long long>(requests), static_cast<unsigned long long>(a.batch),
      a.max_in_flight, server_cpu);
  std::printf("agent: %s, D-Bus status %s, exit status %d after SIGTERM\n", a.agent.c_str(),
              bus.empty() ? "off (no dbus-daemon)" : "on a private bus",
              WIFEXITED(status) ? WEXITSTATUS(status) : -1);
  // Wall time includes start-up (config, queue open, bus connection) and up to 5 ms of polling.
  print_result("agent", backlog, wall, cpu, std::max(hwm, ru.ru_maxrss));
  std::printf(
      "agent: memory at the end: RssAnon %ld KiB (private) + RssFile %ld KiB (libraries, binary)\n",
      anon, file);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  std::string only;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : "";
    if (k == "--smaps") {
      a.smaps = true;
      continue;
    }
    if (k == "--readings")
      a.readings = std::strtoull(v, nullptr, 10);
    else if (k == "--per-record")
      a.per_record = static_cast<unsigned>(std::atoi(v));
    else if (k == "--batch")
      a.batch = std::strtoull(v, nullptr, 10);
    else if (k == "--server")
      a.server = v;
    else if (k == "--agent")
      a.agent = v;
    else if (k == "--only")
      only = v;
    else if (k == "--max-in-flight")
      a.max_in_flight = static_cast<unsigned>(std::atoi(v));
    else if (k == "--proxy")
      a.proxy_args = v;
    else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
    ++i;
  }
  spdlog::set_level(spdlog::level::err);
  signal(SIGPIPE, SIG_IGN);
  int rc = 0;
  if (only.empty() || only == "library") rc |= run_library(a);
  if (only.empty() || only == "agent") rc |= run_agent(a);
  return rc;
}
