// type: execd — a long-running program (argv, no shell) that prints one JSON object of
// key → value per line whenever it has readings. Push-style: no interval and no timer; records
// are emitted from the stdout callback. The program is restarted with capped exponential backoff
// when it dies, its stderr lines are logged tagged with the source, and it is stopped with
// SIGTERM, then SIGKILL after a grace, on stop() (shutdown, reload) — a stopped program outlives
// its source object until it has died (see stopping_programs()).
#pragma once

#include <sys/types.h>

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "sources/exec_source.hpp"
#include "sources/source.hpp"
#include "util/backoff.hpp"

namespace tb::sources {

class ExecdSource final : public Source {
 public:
  // A line longer than this is discarded up to its newline and counted as an error.
  static constexpr std::size_t kMaxLine = 64 * 1024;
  // Lines read per second. Beyond it the agent stops reading until the next second: the pipe
  // fills and the program blocks in write() — back-pressure costs no CPU and loses nothing.
  static constexpr unsigned kMaxLinesPerSecond = 100;
  // stderr lines logged per kStderrWindow; the rest are counted and the count logged later.
  static constexpr unsigned kStderrLinesPerWindow = 20;
  static constexpr Millis kStderrWindow{10000};
  static constexpr std::size_t kMaxStderrLine = 1024;  // longer stderr lines are cut
  // A program that ran this long before it died starts the restart backoff over.
  static constexpr Millis kHealthyRun{60000};

  static const SourceType& declaration();  // its keys: kProgramKeys, as exec's
  static SourcePtr create(sd_event* loop, const config::SourceConfig& config, std::string* error);
  ~ExecdSource() override;

  bool start(std::function<void(telemetry::Record)> emit, std::string* error) override;
  void stop() override;
  bool started() const override { return started_; }

  // The running program's pid, 0 when none runs.
  pid_t child_pid() const { return child_ ? pid_ : 0; }
  // Programs started since construction (tests, diagnostics).
  unsigned spawns() const { return spawns_; }
  // The ceiling of the next restart delay.
  Millis restart_ceiling() const { return backoff_.ceiling(); }

  // Tuning for tests; the defaults are 1 s initial, 5 min cap, 5 s grace.
  void set_restart_backoff(Millis initial, Millis cap) { backoff_.configure(initial, cap); }
  void set_stop_grace(Millis grace) { stop_grace_ = grace; }

 protected:
  // collect(): the next line the program prints (starting it when none runs), bounded by
  // `timeout`. Used by --test.
  void begin() override;
  void cancel() override;

 private:
  struct Watch;
  ExecdSource(sd_event* loop, config::SourceConfig config);
  const ProgramSettings& settings_;

  bool spawn();
  void schedule_restart();
  void terminate();  // SIGTERM now, SIGKILL after the grace; the program outlives this object
  void close_pipes();
  static int on_child(sd_event_source* s, const siginfo_t* si, void* userdata);
  static int on_stdout(sd_event_source* s, int fd, std::uint32_t revents, void* userdata);
  static int on_stderr(sd_event_source* s, int fd, std::uint32_t revents, void* userdata);
  static int on_timer(sd_event_source* s, std::uint64_t usec, void* userdata);
  void child_exited(const siginfo_t& si);
  void read_stdout(bool final);
  void pump(bool unlimited);
  bool line_budget();
  void throttle();
  void handle_line(std::string_view line);
  void reject(const std::string& error);
  void read_stderr();
  void log_stderr(std::string_view line);
  void timer_fired(sd_event_source* s);
  std::uint64_t now_usec() const;

  std::vector<std::string> env_;
  std::function<void(telemetry::Record)> emit_;
  bool started_ = false;
  bool waiting_ = false;  // a collect() waits for the next line

  pid_t pid_ = 0;
  Watch* child_ = nullptr;  // the running program's watch; nullptr when none runs
  sd_event_source* out_ = nullptr;
  sd_event_source* err_ = nullptr;
  std::uint64_t spawned_at_ = 0;
  unsigned spawns_ = 0;

  std::string out_buf_;
  bool discarding_ = false;  // inside a line longer than kMaxLine
  std::string err_buf_;
  bool err_discarding_ = false;

  std::uint64_t window_start_ = 0;
  unsigned window_lines_ = 0;
  std::uint64_t stderr_window_start_ = 0;
  unsigned stderr_lines_ = 0;
  std::uint64_t stderr_suppressed_ = 0;

  // Rejected lines: the first is logged, then at most one a minute with the count in between.
  std::uint64_t rejects_unlogged_ = 0;
  std::uint64_t reject_logged_at_ = 0;
  bool reject_logged_ = false;

  sd_event_source* restart_timer_ = nullptr;
  sd_event_source* throttle_timer_ = nullptr;
  sd_event_source* wait_timer_ = nullptr;
  Backoff backoff_{Millis(1000), Millis(5 * 60 * 1000)};
  Millis stop_grace_{5000};
};

// Programs that were stopped (SIGTERM sent) and have not died yet, across all execd sources.
// The daemon waits for them at shutdown; `on_all_stopped` runs from the loop when the count
// drops to zero (never while the loop is being freed).
std::size_t stopping_programs();
void set_on_all_programs_stopped(std::function<void()> on_all_stopped);

}  // namespace tb::sources
