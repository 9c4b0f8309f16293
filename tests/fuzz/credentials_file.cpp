// Fuzzes the reader of <state_dir>/credentials.json (tb::credentials::load): the input is the
// file. A file it accepts must survive save() and load() unchanged.
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
  tb::fuzz::write_file(dir / tb::credentials::kCredentialsFile, data, size);
  std::string error;
  const auto creds = tb::credentials::load(dir, &error);
  if (!creds) {
    TB_FUZZ_CHECK(!error.empty(), "rejected without a reason");
    return 0;
  }
  TB_FUZZ_CHECK(tb::credentials::save(dir, *creds, &error), "save of what load accepted");
  const auto again = tb::credentials::load(dir, &error);
  TB_FUZZ_CHECK(again && again->type == creds->type && again->value == creds->value &&
                    again->device_name == creds->device_name,
                "save/load round trip");
  return 0;
}
