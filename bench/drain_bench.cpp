// Drain benchmark (issue 3): a backlog of N readings in the durable queue, delivered to
// tb-test-server on loopback through the agent's own path (Queue → Uploader → coap::Client on
// sd-event). Prints readings/s, CPU seconds and peak RSS of the draining process.
//
//   tb-bench-drain [--readings N] [--per-record K] [--batch BYTES] [--server PATH]
//
// The backlog is written by a forked child, so the peak RSS printed is the drain's alone.
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>

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

long peak_rss_kib() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss;
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

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    if (k == "--readings")
      a.readings = std::strtoull(argv[i + 1], nullptr, 10);
    else if (k == "--per-record")
      a.per_record = static_cast<unsigned>(std::atoi(argv[i + 1]));
    else if (k == "--batch")
      a.batch = std::strtoull(argv[i + 1], nullptr, 10);
    else if (k == "--server")
      a.server = argv[i + 1];
  }
  spdlog::set_level(spdlog::level::err);
  char tmpl[] = "/tmp/tb-bench-drain-XXXXXX";
  const fs::path dir = mkdtemp(tmpl);

  // 1. The backlog, written by a child process.
  pid_t child = fork();
  if (child == 0) _exit(fill(dir, a));
  int status = 0;
  waitpid(child, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return 1;

  // 2. The server, pre-provisioned with the bench device.
  int out[2];
  if (pipe(out) != 0) return 1;
  pid_t server = fork();
  if (server == 0) {
    dup2(out[1], 1);
    close(out[0]);
    const std::string state = (dir / "server.json").string();
    execl(a.server.c_str(), a.server.c_str(), "--port", "0", "--bind", "127.0.0.1", "--quiet",
          "--state", state.c_str(), "--record", "/dev/null", "--device", "bench=BENCHTOKEN",
          static_cast<char*>(nullptr));
    _exit(127);
  }
  close(out[1]);
  char line[256] = {};
  FILE* f = fdopen(out[0], "r");
  if (!f || !std::fgets(line, sizeof line, f)) {
    std::fprintf(stderr, "server did not start (%s)\n", a.server.c_str());
    return 1;
  }
  const char* p = std::strrchr(line, ' ');
  const auto port = static_cast<std::uint16_t>(std::atoi(p ? p + 1 : line));

  // 3. Drain.
  sd_event* loop = nullptr;
  sd_event_new(&loop);
  std::string warn, err;
  config::QueueConfig qc;
  qc.max_size = 1ull << 30;
  auto queue = telemetry::Queue::open(dir, qc, &warn, &err);
  auto client = coap::Client::create(loop, {"127.0.0.1", port}, {}, &err);
  if (!queue || !client) {
    std::fprintf(stderr, "setup: %s\n", err.c_str());
    return 1;
  }
  const std::uint64_t backlog = queue->queued_readings();
  config::DeliveryConfig dc;
  dc.max_batch_size = a.batch;
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

  std::printf("drain: %llu readings (%u per record) in %llu requests of <= %llu bytes\n",
              static_cast<unsigned long long>(backlog), a.per_record,
              static_cast<unsigned long long>(requests), static_cast<unsigned long long>(a.batch));
  std::printf("drain: %.2f s wall, %.0f readings/s, %.2f CPU s (agent side), peak RSS %.1f MiB\n",
              wall, static_cast<double>(backlog) / wall, cpu,
              static_cast<double>(peak_rss_kib()) / 1024.0);
  // Peak RSS counts the shared libraries' file-backed pages (libcrypto, libstdc++, sqlite, ...),
  // which other processes share and the kernel can evict; the agent's own memory is RssAnon.
  std::printf(
      "memory: VmHWM %ld KiB = RssAnon %ld KiB (private) + RssFile %ld KiB (shared "
      "libraries, binary); Pss %ld KiB\n",
      proc_kib("/proc/self/status", "VmHWM"), proc_kib("/proc/self/status", "RssAnon"),
      proc_kib("/proc/self/status", "RssFile"), proc_kib("/proc/self/smaps_rollup", "Pss"));
  up.pause();
  client.reset();
  queue.reset();
  sd_event_unref(loop);
  kill(server, SIGTERM);
  waitpid(server, &status, 0);
  rusage children{};
  getrusage(RUSAGE_CHILDREN, &children);  // the fill child and the server
  std::printf("server+fill CPU: %.2f s\n",
              static_cast<double>(children.ru_utime.tv_sec + children.ru_stime.tv_sec) +
                  static_cast<double>(children.ru_utime.tv_usec + children.ru_stime.tv_usec) / 1e6);
  fs::remove_all(dir);
  return r == 0 ? 0 : 1;
}
