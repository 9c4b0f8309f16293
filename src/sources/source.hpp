// Sources produce telemetry records, each on its own interval, stamped when read. A factory map
// of types (Waybar style) builds them from their config; each source owns its own sd-event timer
// and, for exec, its child process — nothing blocks the loop.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <systemd/sd-event.h>

#include "config/config.hpp"
#include "telemetry/record.hpp"

namespace tb::sources {

struct SourceStatus {
  std::string name;
  std::string type;
  Millis interval{0};
  std::uint64_t readings = 0;     // readings produced since start
  std::uint64_t errors = 0;       // failed collections since start
  std::int64_t last_ts_ms = 0;    // last successful collection; 0 = never
  std::string last_error;         // empty after a success
};

// A finished collection: a record, or an error sentence.
struct Collected {
  std::optional<telemetry::Record> record;
  std::string error;
};

using CollectDone = std::function<void(Collected)>;

class Source {
 public:
  virtual ~Source() = default;
  const config::SourceConfig& config() const { return config_; }
  const SourceStatus& status() const { return status_; }

  // Collect once, asynchronously; `done` runs from the loop (never inside collect()). At most one
  // collection runs at a time per source; a call while one runs is answered with an error.
  virtual void collect(CollectDone done) = 0;
  // Abort a running collection (exec: kill the child). `done` of that collection is not called.
  virtual void abort() = 0;

  // Periodic collection: collect now and then every interval, handing each record to `emit`.
  // Errors are logged (rate-limited) and recorded in status().
  bool start(std::function<void(telemetry::Record)> emit, std::string* error);
  void stop();

 protected:
  Source(sd_event* loop, config::SourceConfig config, std::string type);
  sd_event* loop_;
  config::SourceConfig config_;
  SourceStatus status_;

 private:
  static int on_timer(sd_event_source* s, std::uint64_t usec, void* userdata);
  void finish(Collected c);
  sd_event_source* timer_ = nullptr;
  std::function<void(telemetry::Record)> emit_;
  bool collecting_ = false;
};

using SourcePtr = std::unique_ptr<Source>;

// Builds a source from its config via the registry of types. nullptr + *error on failure.
SourcePtr make_source(sd_event* loop, const config::SourceConfig& config, std::string* error);

}  // namespace tb::sources
