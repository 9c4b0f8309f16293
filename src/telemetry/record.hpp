// What sources produce and the queue stores: one collection of one source at one instant.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace tb::telemetry {

// ThingsBoard keeps booleans, longs, doubles and strings apart (docs/thingsboard-coap.md §1,
// "Value typing"), so we do too.
using Value = std::variant<bool, std::int64_t, double, std::string>;

struct Reading {
  std::string key;
  Value value;
};

struct Record {
  std::int64_t ts_ms = 0;  // wall time when read, Unix ms
  std::string source;      // the source's name (logs, D-Bus)
  std::vector<Reading> readings;
};

// False for NaN and ±Inf: JSON has no spelling for them, so such a reading is skipped.
bool is_encodable(const Value& value);

// {"k":v,...} — the "values" object of ThingsBoard's {"ts":…,"values":{…}} shape. Readings that
// are not encodable are left out; *encoded (if given) receives how many went in.
std::string encode_values(const std::vector<Reading>& readings);
std::string encode_values(const std::vector<Reading>& readings, std::size_t* encoded);
// Appends {"ts":N,"values":<values_json>} — how the queue rebuilds a record from its row.
void append_record(std::string& out, std::int64_t ts_ms, std::string_view values_json);
// The length append_record adds, without building it.
std::size_t record_size(std::int64_t ts_ms, std::size_t values_json_size);
// {"ts":N,"values":{...}}
std::string encode_record(const Record& record);
// [{"ts":…,"values":{…}}, …] — what --test prints and what a batch carries.
std::string encode_records(const std::vector<Record>& records);

// One hash of (ts, key) per reading of a batch payload built by append_record. ThingsBoard
// stores a point by (device, key, ts) (docs/queue.md), so two batches whose hashes are disjoint
// cannot overwrite each other's points, whatever order they arrive in; a hash collision only
// makes them look related. nullopt when the payload is not in that shape.
std::optional<std::vector<std::uint64_t>> point_hashes(std::string_view batch);

}  // namespace tb::telemetry
