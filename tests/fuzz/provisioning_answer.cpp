// Fuzzes the decoder of ThingsBoard's provisioning answer (tb::provisioning::decode_answer):
// the first two bytes choose the CoAP response code, the rest is the payload.
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz_util.hpp"
#include "provisioning/codec.hpp"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tb::fuzz::quiet_logs();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 2) return -1;
  // A CoAP code is class (3 bits) . detail (5 bits) (RFC 7252 §3); the codec takes class*100 +
  // detail. The second byte picks a realistic code most of the time and any int otherwise.
  const int coap = (data[0] >> 5) * 100 + (data[0] & 0x1f);
  const int code = data[1] < 0xf0 ? coap : static_cast<int>(data[0]) * 100 - 1000;
  const std::string payload(tb::fuzz::as_text(data + 2, size - 2));
  const auto answer = tb::provisioning::decode_answer(code, payload);
  TB_FUZZ_CHECK(tb::provisioning::verdict_name(answer.verdict) != nullptr, "verdict name");
  if (answer.verdict == tb::provisioning::Verdict::Success) {
    TB_FUZZ_CHECK(code / 100 == 2, "success only for a 2.xx answer");
    TB_FUZZ_CHECK(!answer.credentials_value.empty(), "success without a token");
  }
  return 0;
}
