// Fuzzes the provisioning request encoder (tb::provisioning::encode_request) with arbitrary bytes
// in every field: the key, secret and device name come from the config file (or a secret file,
// or the hostname), so nothing guarantees they are UTF-8. The encoder must not throw, and the
// request must be JSON that carries the fields unchanged when they are UTF-8.
#include <fuzzer/FuzzedDataProvider.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "fuzz_util.hpp"
#include "provisioning/codec.hpp"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tb::fuzz::quiet_logs();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  tb::provisioning::Request r;
  r.key = in.ConsumeRandomLengthString(128);
  r.secret = in.ConsumeRandomLengthString(128);
  r.device_name = in.ConsumeRandomLengthString(128);
  r.token = in.ConsumeRemainingBytesAsString();
  const std::string body = tb::provisioning::encode_request(r);
  const auto j = nlohmann::json::parse(body, nullptr, false);
  TB_FUZZ_CHECK(!j.is_discarded() && j.is_object(), "request is a JSON object");
  TB_FUZZ_CHECK(j.value("credentialsType", "") == "ACCESS_TOKEN", "credentialsType");
  auto same = [&](const char* field, const std::string& given) {
    if (tb::fuzz::valid_utf8(given)) TB_FUZZ_CHECK(j.value(field, "") == given, field);
  };
  same("provisionDeviceKey", r.key);
  same("provisionDeviceSecret", r.secret);
  same("deviceName", r.device_name);
  if (!r.token.empty()) same("token", r.token);
  return 0;
}
