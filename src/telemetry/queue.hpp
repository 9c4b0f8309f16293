// The durable telemetry queue (SQLite in WAL mode). A record enters before anything else happens
// to it and leaves only when the server acknowledged (2.01) the batch that carried it, or when the
// limits (queue.max_size, queue.max_age) force the oldest out — which is counted.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "config/config.hpp"
#include "telemetry/record.hpp"

namespace tb::telemetry {

struct QueuedRecord {
  std::int64_t id = 0;
  std::int64_t ts_ms = 0;
  std::string values_json;  // the encoded "values" object
  std::uint32_t readings = 0;
};

// A batch ready to POST: the payload and what it carries.
struct Batch {
  std::string payload;            // [{"ts":…,"values":{…}},…]
  std::vector<std::int64_t> ids;  // queue ids to ack or drop
  std::uint64_t readings = 0;
  bool empty() const { return ids.empty(); }
};

// How push() makes a record durable (docs/queue.md, "fsync policy"). Full: the WAL is fsynced
// before push() returns, so a record survives power loss. Normal: it survives kill -9 and a
// service restart, but the last transactions may be lost on power loss.
enum class Sync { Full, Normal };

struct QueueOptions {
  Sync sync = Sync::Full;
};

class Queue {
 public:
  virtual ~Queue() = default;

  // Opens (creating if needed) the queue in `state_dir`. A corrupt or incompatible file is moved
  // aside and a fresh one started; that is reported through *warning, not as a failure.
  static std::unique_ptr<Queue> open(const std::filesystem::path& state_dir,
                                     const config::QueueConfig& limits, std::string* warning,
                                     std::string* error);
  static std::unique_ptr<Queue> open(const std::filesystem::path& state_dir,
                                     const config::QueueConfig& limits, const QueueOptions& options,
                                     std::string* warning, std::string* error);

  // Durable when it returns true (with Sync::Full). On false (disk full, read-only) nothing was
  // stored, except when the disk failed to confirm the write (fsync): the records are queued
  // then, and false reports the failure.
  virtual bool push(const Record& record, std::string* error) = 0;
  // Several records in one transaction: one commit (one fsync with Sync::Full) for all of them,
  // which is what makes the readings of sources that woke together cheap. All or nothing: on
  // false none was stored.
  virtual bool push_all(std::span<const Record> records, std::string* error) {
    for (const auto& r : records)
      if (!push(r, error)) return false;
    return true;
  }
  // The next batch whose payload is at most max_bytes (always at least one record if any is
  // queued, even when that one alone is larger), in the configured drain order. Records already
  // handed out in an unacknowledged batch are not handed out again until released.
  virtual Batch next_batch(std::uint64_t max_bytes) = 0;
  // The server acknowledged the batch: remove its records.
  virtual bool ack(const Batch& batch, std::string* error) = 0;
  // The same for several batches in one transaction (one commit, one set of WAL frames: the
  // uploader coalesces the answers of one loop wake-up, docs/performance.md "Coalesced acks").
  // All or nothing: on false every batch is released and none removed.
  virtual bool ack_all(const std::vector<const Batch*>& batches, std::string* error) {
    for (std::size_t i = 0; i < batches.size(); ++i) {
      if (!ack(*batches[i], error)) {
        for (std::size_t j = i + 1; j < batches.size(); ++j) release(*batches[j]);
        return false;
      }
    }
    return true;
  }
  // The batch could not be delivered now: make its records available again.
  virtual void release(const Batch& batch) = 0;
  // The server rejected the payload for good (4.00): remove and count as dropped.
  virtual bool drop(const Batch& batch, std::string* error) = 0;
  // Apply queue.max_size / queue.max_age now; returns readings dropped by this call.
  virtual std::uint64_t enforce_limits(std::int64_t now_ms) = 0;
  virtual void set_limits(const config::QueueConfig& limits) = 0;

  // The wall clock was stepped (docs/queue.md, "Timestamps and the clock"): the newest record's
  // id (0: none), and moving the ts of every record after a given id by the step.
  virtual std::int64_t last_id() { return 0; }
  virtual bool shift_ts(std::int64_t /*after_id*/, std::int64_t /*delta_ms*/,
                        std::uint64_t* /*moved*/, std::string* /*error*/) {
    return true;
  }
  // While the clock is not set, records stamped before `ts_ms` are kept but not handed out by
  // next_batch (0: nothing held).
  virtual void hold_before(std::int64_t /*ts_ms*/) {}
  // The file was deleted while open (its state directory removed): copy every record into a new
  // file at the same path and go on there. The directory must exist again.
  virtual bool recreate_file(std::string* /*error*/) { return true; }

  virtual std::uint64_t queued_readings() const = 0;
  virtual std::uint64_t queued_records() const = 0;
  virtual std::uint64_t dropped_readings() const = 0;  // since open
  // What queue.max_size is compared with: the database file's pages in use (page_count ×
  // page_size) plus the room the WAL may take (docs/queue.md, "Limits").
  virtual std::uint64_t size_on_disk() { return 0; }
  // How many times SQL was compiled since open (SQLite's authorizer counts it). Pushing, handing
  // out and acking records reuse prepared statements; a PRAGMA among them would be compiled
  // again at every step, and the parser's code kept in the loop's memory (docs/performance.md).
  virtual std::uint64_t sql_compilations() const { return 0; }
  // The database file, for messages and tests.
  virtual std::filesystem::path path() const { return {}; }
};

}  // namespace tb::telemetry
