// Fuzzes what the server sends the downlink (docs/attributes.md): shared-attribute
// notifications and GET answers (tb::attributes) and server-side RPC requests (tb::rpc). The
// first byte picks the parser; the rest is the payload. A payload that parses must respect the
// bounds the parsers promise.
#include <cstddef>
#include <cstdint>
#include <string>

#include "attributes/codec.hpp"
#include "fuzz_util.hpp"
#include "rpc/codec.hpp"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tb::fuzz::quiet_logs();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1) return -1;
  const std::string payload(reinterpret_cast<const char*>(data + 1), size - 1);
  std::string error;
  switch (data[0] % 3) {
    case 0: {
      auto u = tb::attributes::parse_notification(payload, &error);
      TB_FUZZ_CHECK(u.has_value() == error.empty(), "an error exactly when refused");
      if (u) {
        TB_FUZZ_CHECK(payload.size() <= tb::attributes::kMaxPayload, "size bound");
        TB_FUZZ_CHECK(u->values.size() <= tb::attributes::kMaxKeys, "key bound");
        TB_FUZZ_CHECK(tb::attributes::nesting_depth(payload) <= tb::attributes::kMaxDepth,
                      "depth bound");
      }
      break;
    }
    case 1: {
      auto u = tb::attributes::parse_get_answer(payload, &error);
      TB_FUZZ_CHECK(u.has_value() == error.empty(), "an error exactly when refused");
      break;
    }
    default: {
      auto r = tb::rpc::parse_request(payload, &error);
      TB_FUZZ_CHECK(r.has_value() == error.empty(), "an error exactly when refused");
      if (r) {
        TB_FUZZ_CHECK(r->id >= 0, "ids are not negative");
        TB_FUZZ_CHECK(!r->method.empty() && r->method.size() <= tb::rpc::kMaxMethod, "method");
        (void)tb::rpc::request_key(*r);
      }
      break;
    }
  }
  return 0;
}
