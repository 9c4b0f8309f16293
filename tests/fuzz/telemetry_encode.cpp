// Fuzzes the telemetry JSON encoder (tb::telemetry::encode_values / encode_records) with readings
// built from the input: keys and strings of arbitrary bytes (sources read binary files and program
// output), any int64 and any double (NaN and infinities included). The encoder must never throw,
// and what it produces must be valid JSON that says what the readings said: this is what the
// server receives.
#include <fuzzer/FuzzedDataProvider.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "fuzz_util.hpp"
#include "telemetry/record.hpp"

namespace {

using tb::telemetry::Reading;
using tb::telemetry::Record;
using tb::telemetry::Value;

Value make_value(FuzzedDataProvider& in) {
  switch (in.ConsumeIntegralInRange<int>(0, 3)) {
    case 0:
      return in.ConsumeBool();
    case 1:
      return in.ConsumeIntegral<std::int64_t>();
    case 2:
      return in.ConsumeFloatingPoint<double>();  // includes NaN, ±Inf, subnormals
    default:
      return in.ConsumeRandomLengthString(256);
  }
}

// The reading that ended up under `key` in the encoded object must be the one we gave.
void check_value(const Value& given, const nlohmann::json& got) {
  switch (given.index()) {
    case 0:
      TB_FUZZ_CHECK(got.is_boolean() && got.get<bool>() == std::get<bool>(given), "bool");
      break;
    case 1:
      TB_FUZZ_CHECK(got.is_number_integer(), "int64 stays an integer");
      TB_FUZZ_CHECK(got.get<std::int64_t>() == std::get<std::int64_t>(given), "int64 value");
      break;
    case 2:
      // Always with a fraction or exponent, so ThingsBoard stores a double, never a long.
      TB_FUZZ_CHECK(got.is_number_float(), "double stays a double");
      TB_FUZZ_CHECK(got.get<double>() == std::get<double>(given), "double round trip");
      break;
    default: {
      TB_FUZZ_CHECK(got.is_string(), "string");
      const auto& s = std::get<std::string>(given);
      if (tb::fuzz::valid_utf8(s))
        TB_FUZZ_CHECK(got.get<std::string>() == s, "UTF-8 string kept as is");
      break;
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tb::fuzz::quiet_logs();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  std::vector<Record> records(in.ConsumeIntegralInRange<std::size_t>(1, 4));
  for (auto& rec : records) {
    rec.ts_ms = in.ConsumeIntegral<std::int64_t>();
    const auto n = in.ConsumeIntegralInRange<std::size_t>(0, 16);
    for (std::size_t i = 0; i < n && in.remaining_bytes() > 0; ++i) {
      Reading r;
      r.key = in.ConsumeRandomLengthString(64);
      r.value = make_value(in);
      rec.readings.push_back(std::move(r));
    }
  }

  for (const auto& rec : records) {
    std::size_t encoded = 0;
    const std::string values = tb::telemetry::encode_values(rec.readings, &encoded);
    const auto j = nlohmann::json::parse(values, nullptr, false);
    TB_FUZZ_CHECK(!j.is_discarded() && j.is_object(), "values are a JSON object");
    std::size_t expected = 0;
    for (const auto& r : rec.readings) expected += tb::telemetry::is_encodable(r.value);
    TB_FUZZ_CHECK(encoded == expected, "encoded count");
    // Keys are unique after UTF-8 repair only when they were unique before; check the values of
    // readings whose key is valid UTF-8 and appears once.
    for (const auto& r : rec.readings) {
      if (!tb::telemetry::is_encodable(r.value) || !tb::fuzz::valid_utf8(r.key)) continue;
      std::size_t same = 0;
      for (const auto& o : rec.readings)
        same += (o.key == r.key && tb::telemetry::is_encodable(o.value));
      if (same == 1) check_value(r.value, j.at(r.key));
    }
    const std::string one = tb::telemetry::encode_record(rec);
    TB_FUZZ_CHECK(one.size() == tb::telemetry::record_size(rec.ts_ms, values.size()),
                  "record_size matches encode_record");
    const auto jr = nlohmann::json::parse(one, nullptr, false);
    TB_FUZZ_CHECK(!jr.is_discarded() && jr.at("ts").get<std::int64_t>() == rec.ts_ms, "record");
  }
  const auto all = nlohmann::json::parse(tb::telemetry::encode_records(records), nullptr, false);
  TB_FUZZ_CHECK(!all.is_discarded() && all.is_array() && all.size() == records.size(), "batch");
  return 0;
}
