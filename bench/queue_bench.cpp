// Queue benchmark (issue 3): the cost of enqueueing under each fsync policy, and how fast
// next_batch + ack empty a backlog — the storage half of a drain, without the network.
//
//   tb-bench-queue [--dir DIR] [--full-pushes N] [--normal-pushes N] [--readings N] [--batch BYTES]
//
// --dir puts the queues on the file system under test (default: a new directory in /tmp); fsync
// cost depends entirely on it, so run it on the device's real state_dir file system.
#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "telemetry/queue.hpp"

namespace fs = std::filesystem;
using namespace tb;
using Clock = std::chrono::steady_clock;

namespace {

struct Args {
  fs::path dir;
  std::uint64_t full_pushes = 5000;
  std::uint64_t normal_pushes = 20000;
  std::uint64_t readings = 100000;
  std::uint64_t batch = 1024;
};

constexpr unsigned kPerRecord = 5;  // one collection of a source with five keys

double cpu_seconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

telemetry::Record make_record(std::uint64_t i) {
  telemetry::Record r;
  r.ts_ms = 1700000000000 + static_cast<std::int64_t>(i) * 1000;
  r.source = "bench";
  r.readings = {{"temperature", 20.0 + static_cast<double>(i % 100) / 8},
                {"humidity", static_cast<std::int64_t>(40 + i % 30)},
                {"fan", i % 2 == 0},
                {"state", std::string("running")},
                {"load", 0.01 * static_cast<double>(i % 997)}};
  return r;
}

std::unique_ptr<telemetry::Queue> open(const fs::path& dir, telemetry::Sync sync) {
  std::string warn, err;
  config::QueueConfig qc;
  qc.max_size = 1ull << 30;  // measure the queue, not the limits
  auto q = telemetry::Queue::open(dir, qc, {sync}, &warn, &err);
  if (!warn.empty()) std::fprintf(stderr, "warning: %s\n", warn.c_str());
  if (!q) std::fprintf(stderr, "open %s: %s\n", dir.c_str(), err.c_str());
  return q;
}

bool enqueue(const fs::path& dir, telemetry::Sync sync, std::uint64_t n, const char* name) {
  auto q = open(dir, sync);
  if (!q) return false;
  std::string err;
  const auto t0 = Clock::now();
  for (std::uint64_t i = 0; i < n; ++i) {
    if (!q->push(make_record(i), &err)) {
      std::fprintf(stderr, "push: %s\n", err.c_str());
      return false;
    }
  }
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  std::printf(
      "enqueue, synchronous=%-6s %6llu pushes of %u readings: %8.1f us/record, %7.1f "
      "us/reading\n",
      name, static_cast<unsigned long long>(n), kPerRecord, s * 1e6 / static_cast<double>(n),
      s * 1e6 / static_cast<double>(n * kPerRecord));
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const char* v = argv[i + 1];
    if (k == "--dir")
      a.dir = v;
    else if (k == "--full-pushes")
      a.full_pushes = std::strtoull(v, nullptr, 10);
    else if (k == "--normal-pushes")
      a.normal_pushes = std::strtoull(v, nullptr, 10);
    else if (k == "--readings")
      a.readings = std::strtoull(v, nullptr, 10);
    else if (k == "--batch")
      a.batch = std::strtoull(v, nullptr, 10);
    else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  fs::path root;
  if (a.dir.empty()) {
    char tmpl[] = "/tmp/tb-bench-queue-XXXXXX";
    root = mkdtemp(tmpl);
  } else {
    root = a.dir / ("tb-bench-queue-" + std::to_string(getpid()));
  }
  std::printf("queue benchmark in %s\n", root.c_str());

  int rc = 0;
  if (!enqueue(root / "full", telemetry::Sync::Full, a.full_pushes, "FULL") ||
      !enqueue(root / "normal", telemetry::Sync::Normal, a.normal_pushes, "NORMAL")) {
    rc = 1;
  }

  // The backlog: a.readings readings, written with NORMAL (its cost is not what is measured).
  const fs::path drain_dir = root / "drain";
  if (rc == 0) {
    auto q = open(drain_dir, telemetry::Sync::Normal);
    std::string err;
    for (std::uint64_t i = 0; q && i < a.readings / kPerRecord; ++i) {
      if (!q->push(make_record(i), &err)) {
        std::fprintf(stderr, "push: %s\n", err.c_str());
        rc = 1;
        break;
      }
    }
    if (!q) rc = 1;
  }
  if (rc == 0) {
    auto q = open(drain_dir, telemetry::Sync::Full);  // as the agent opens it
    const std::uint64_t backlog = q ? q->queued_readings() : 0;
    std::uint64_t batches = 0, bytes = 0;
    std::string err;
    const double cpu0 = cpu_seconds();
    const auto t0 = Clock::now();
    while (q) {
      telemetry::Batch b = q->next_batch(a.batch);
      if (b.empty()) break;
      ++batches;
      bytes += b.payload.size();
      if (!q->ack(b, &err)) {
        std::fprintf(stderr, "ack: %s\n", err.c_str());
        rc = 1;
        break;
      }
    }
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    const double cpu = cpu_seconds() - cpu0;
    std::printf(
        "next_batch+ack, %llu readings in %llu batches of <= %llu bytes (avg %.0f): "
        "%.3f s, %.0f readings/s, %.2f CPU s\n",
        static_cast<unsigned long long>(backlog), static_cast<unsigned long long>(batches),
        static_cast<unsigned long long>(a.batch),
        batches ? static_cast<double>(bytes) / static_cast<double>(batches) : 0.0, s,
        static_cast<double>(backlog) / s, cpu);
    if (q && q->queued_readings() != 0) {
      std::fprintf(stderr, "backlog not drained: %llu left\n",
                   static_cast<unsigned long long>(q->queued_readings()));
      rc = 1;
    }
  }

  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  std::printf("peak RSS: %.1f MiB (whole run)\n", static_cast<double>(ru.ru_maxrss) / 1024.0);
  std::error_code ec;
  fs::remove_all(root, ec);
  return rc;
}
