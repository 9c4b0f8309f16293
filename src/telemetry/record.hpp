// What sources produce and the queue stores: one collection of one source at one instant.
#pragma once

#include <cstdint>
#include <string>
#include <variant>
#include <vector>

namespace tb::telemetry {

// ThingsBoard keeps booleans, longs, doubles and strings apart (thingsboard-coap-api.md §1,
// "Value typing"), so we do too.
using Value = std::variant<bool, std::int64_t, double, std::string>;

struct Reading {
  std::string key;
  Value value;
};

struct Record {
  std::int64_t ts_ms = 0;   // wall time when read, Unix ms
  std::string source;       // the source's name (logs, D-Bus)
  std::vector<Reading> readings;
};

// {"k":v,...} — the "values" object of ThingsBoard's {"ts":…,"values":{…}} shape.
std::string encode_values(const std::vector<Reading>& readings);
// {"ts":N,"values":{...}}
std::string encode_record(const Record& record);
// [{"ts":…,"values":{…}}, …] — what --test prints and what a batch carries.
std::string encode_records(const std::vector<Record>& records);

}  // namespace tb::telemetry
