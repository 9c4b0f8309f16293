// Fuzzes the reader of <state_dir>/provisioning.json (tb::credentials::load_pending): the input is
// the file. A record it accepts must survive save_pending() and load_pending() unchanged.
#include <cstddef>
#include <cstdint>
#include <string>

#include "credentials/credentials.hpp"
#include "fuzz_util.hpp"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tb::fuzz::quiet_logs();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto& dir = tb::fuzz::scratch_dir();
  tb::fuzz::write_file(dir / tb::credentials::kPendingFile, data, size);
  std::string error;
  const auto pending = tb::credentials::load_pending(dir, &error);
  if (!pending) return 0;
  TB_FUZZ_CHECK(tb::credentials::save_pending(dir, *pending, &error), "save of what load accepted");
  const auto again = tb::credentials::load_pending(dir, &error);
  TB_FUZZ_CHECK(again && again->device_name == pending->device_name &&
                    again->token == pending->token && again->attempts == pending->attempts &&
                    again->first_attempt_ms == pending->first_attempt_ms,
                "save/load round trip");
  return 0;
}
