// Fuzzes the YAML config loader (tb::config::load_string, with the source types reading their
// keys): every input, valid YAML or not, must come back as a config or as diagnostics — no
// exception, no crash, bounded time and memory. An accepted config then goes where the agent sends
// it first: into the provisioning request.
#include <cstddef>
#include <cstdint>
#include <string>

#include "config/config.hpp"
#include "fuzz_util.hpp"
#include "provisioning/codec.hpp"
#include "sources/source_type.hpp"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tb::fuzz::quiet_logs();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(tb::fuzz::as_text(data, size));
  const auto result = tb::config::load_string(text, "fuzz.yaml", tb::sources::source_types());
  TB_FUZZ_CHECK(result.ok() == result.diagnostics.empty(), "config xor diagnostics");
  for (const auto& d : result.diagnostics) {
    TB_FUZZ_CHECK(!d.message.empty(), "diagnostic without a message");
    (void)d.to_string();
  }
  if (result.ok() && result.config->provisioning.present) {
    const auto& c = *result.config;
    (void)tb::provisioning::encode_request(
        {c.provisioning.key, c.provisioning.secret, c.device.name, "A1b2C3d4E5f6G7h8I9j0"});
  }
  return 0;
}
