// Sources produce telemetry records, each on its own interval, stamped when read. A factory map
// of types (Waybar style) builds them from their config; each source owns its own sd-event timer
// and, for exec, its child process — nothing blocks the loop.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <systemd/sd-event.h>

#include "config/config.hpp"
#include "telemetry/record.hpp"

namespace tb::sources {

// Collection is the least urgent work on the loop (architecture.md, "One loop": signals > bus >
// CoAP I/O > delivery > collection). Every sd-event source a Source creates uses it.
inline constexpr int kCollectionPriority = SD_EVENT_PRIORITY_IDLE;

struct SourceStatus {
  std::string name;
  std::string type;
  Millis interval{0};
  std::uint64_t readings = 0;   // readings produced since start
  std::uint64_t errors = 0;     // failed collections since start (execd: rejected lines, exits)
  std::uint64_t skipped = 0;    // ticks skipped because the previous collection still ran
  std::int64_t last_ts_ms = 0;  // last successful collection; 0 = never
  std::string last_error;       // empty after a success
};

// A finished collection: a record, or an error sentence.
struct Collected {
  std::optional<telemetry::Record> record;
  std::string error;
};

using CollectDone = std::function<void(Collected)>;

class Source {
 public:
  // Subclasses must end their own running collection in their destructor (the base cannot call
  // cancel() from here); the base releases its timer and drops undelivered results.
  virtual ~Source();
  Source(const Source&) = delete;
  Source& operator=(const Source&) = delete;

  const config::SourceConfig& config() const { return config_; }
  const SourceStatus& status() const { return status_; }

  // Collect once, asynchronously; `done` runs from the loop (never inside collect()). At most one
  // collection runs at a time per source; a call while one runs is answered with an error.
  // Every finished collection updates status(); only periodic ones are logged and emitted.
  void collect(CollectDone done);
  // Abort a running collection (exec: kill the child). `done` of that collection is not called.
  void abort();
  // True from collect() until its `done` has run (or abort()).
  bool collecting() const { return collecting_; }

  // Periodic collection: collect now and then every interval, handing each record to `emit`.
  // Errors are logged (rate-limited) and recorded in status(). Ticks are planned from the first
  // one (start + k·interval), so collection time does not make them drift; a tick that finds
  // the previous collection still running is skipped and counted in status().skipped.
  // A push-style source (execd: a long-running program that reports whenever it has readings)
  // overrides start/stop/started and emits from its own loop callbacks instead of a timer.
  virtual bool start(std::function<void(telemetry::Record)> emit, std::string* error);
  // Stops the timer and aborts a running collection. start() may be called again.
  virtual void stop();
  virtual bool started() const { return timer_ != nullptr; }

  // A failing source logs its first error, then again only when the text changes or after this
  // long (default 10 min) — a source failing every second must not flood the journal.
  void set_error_log_interval(Millis interval) { error_log_interval_ = interval; }

 protected:
  Source(sd_event* loop, config::SourceConfig config, std::string type);

  // Starts one collection. The subclass calls complete() exactly once per begin() — from begin()
  // itself or later from one of its loop callbacks — unless cancel() comes first. The base
  // delivers the result to `done` from a later loop iteration in every case.
  virtual void begin() = 0;
  // Ends the running collection without completing it (exec: kill the child). Must be
  // idempotent and must not call complete().
  virtual void cancel() = 0;
  void complete(Collected c);
  // A record produced outside any collection (a push source, e.g. a plugin's on_event): counted
  // and handed to `emit` like a periodic collection's; dropped when not started.
  void push(telemetry::Record record);

  sd_event* loop_;
  config::SourceConfig config_;
  SourceStatus status_;

 private:
  struct Reply {
    bool collection = false;  // the running collection's result (cancelled by abort())
    CollectDone done;
    Collected result;
  };
  static int on_timer(sd_event_source* s, std::uint64_t usec, void* userdata);
  static int on_defer(sd_event_source* s, void* userdata);
  void tick();
  void post(Reply reply);
  void deliver_next();
  void account(const Collected& c);
  void finish(Collected c);
  void log_error(const std::string& error);

  sd_event_source* timer_ = nullptr;
  sd_event_source* defer_ = nullptr;
  std::deque<Reply> replies_;
  std::function<void(telemetry::Record)> emit_;
  CollectDone done_;
  bool collecting_ = false;     // collect() called, its done not yet run
  bool in_flight_ = false;      // begin() called, complete() not yet
  std::uint64_t next_due_ = 0;  // CLOCK_BOOTTIME µs of the next planned tick
  bool skip_logged_ = false;

  // Error log rate limiting (see set_error_log_interval).
  Millis error_log_interval_{10 * 60 * 1000};
  bool failing_ = false;
  std::uint64_t failures_ = 0;    // consecutive failed periodic collections
  std::uint64_t unreported_ = 0;  // failures not logged since the last logged one
  std::string reported_error_;
  std::uint64_t reported_at_ = 0;  // CLOCK_BOOTTIME µs
};

using SourcePtr = std::unique_ptr<Source>;

// Builds a source from its config via the registry of types (registry.cpp). nullptr + *error
// on failure.
SourcePtr make_source(sd_event* loop, const config::SourceConfig& config, std::string* error);

}  // namespace tb::sources
