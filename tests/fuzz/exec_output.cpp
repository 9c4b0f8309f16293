// Fuzzes what an exec source makes of its program's stdout (tb::sources::parse_output), and the
// encoding of the record it yields: stdout is whatever the program wrote, up to
// ExecSource::kMaxOutput bytes.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "fuzz_util.hpp"
#include "sources/exec_source.hpp"
#include "telemetry/record.hpp"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tb::fuzz::quiet_logs();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size > tb::sources::ExecSource::kMaxOutput) return -1;  // the source kills the program
  const std::string_view output = tb::fuzz::as_text(data, size);
  tb::telemetry::Record record;
  std::string error;
  if (!tb::sources::parse_output(output, &record, &error)) {
    TB_FUZZ_CHECK(!error.empty(), "rejected without a reason");
    // Error messages go to the journal and D-Bus: short, one line, no control characters.
    TB_FUZZ_CHECK(error.size() < 512, "short error");
    for (const unsigned char c : error) TB_FUZZ_CHECK(c >= 0x20 && c != 0x7f, "printable error");
    return 0;
  }
  const std::string values = tb::telemetry::encode_values(record.readings);
  const auto j = nlohmann::json::parse(values, nullptr, false);
  TB_FUZZ_CHECK(!j.is_discarded() && j.is_object(), "encoded record is a JSON object");
  return 0;
}
