// Answers as ThingsBoard sends them (docs/thingsboard-coap.md §4.2).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "provisioning/codec.hpp"

using namespace tb::provisioning;

TEST(ProvisioningCodec, RequestCarriesKeySecretNameAndOurToken) {
  const auto j = nlohmann::json::parse(encode_request({"K", "S", "pump-7", "tok"}));
  EXPECT_EQ(j["provisionDeviceKey"], "K");
  EXPECT_EQ(j["provisionDeviceSecret"], "S");
  EXPECT_EQ(j["deviceName"], "pump-7");
  EXPECT_EQ(j["credentialsType"], "ACCESS_TOKEN");
  EXPECT_EQ(j["token"], "tok");
}

// Issue 8 #6: a device name that is not UTF-8 made dump() throw type_error.316 (a restart loop).
TEST(ProvisioningCodec, RequestWithANonUtf8NameNeverThrows) {
  std::string body;
  ASSERT_NO_THROW(body = encode_request({"K", "S", "pump-\xE9", "tok"}));
  const auto j = nlohmann::json::parse(body);
  EXPECT_EQ(j["deviceName"], "pump-\xEF\xBF\xBD");
}

TEST(ProvisioningCodec, Success) {
  auto a = decode_answer(
      201, R"({"credentialsValue":"abc","credentialsType":"ACCESS_TOKEN","status":"SUCCESS"})");
  EXPECT_EQ(a.verdict, Verdict::Success);
  EXPECT_EQ(a.credentials_value, "abc");
}

TEST(ProvisioningCodec, NotFoundAndFailure) {
  EXPECT_EQ(
      decode_answer(400, R"({"errorMsg":"Provision data was not found!","status":"NOT_FOUND"})")
          .verdict,
      Verdict::NotFound);
  auto f = decode_answer(400, R"({"errorMsg":"Failed to provision device!","status":"FAILURE"})");
  EXPECT_EQ(f.verdict, Verdict::Failure);
  EXPECT_EQ(f.error_message, "Failed to provision device!");
}

TEST(ProvisioningCodec, EmptyBadRequestAndServerErrors) {
  EXPECT_EQ(decode_answer(400, "").verdict, Verdict::BadRequest);
  EXPECT_EQ(decode_answer(500, "").verdict, Verdict::Retryable);
  EXPECT_EQ(decode_answer(404, "").verdict, Verdict::Unexpected);
  EXPECT_EQ(decode_answer(201, "garbage").verdict, Verdict::Unexpected);
  // SUCCESS for another credentials type is no use to a CoAP token agent.
  EXPECT_EQ(decode_answer(201, R"({"credentialsType":"X509_CERTIFICATE","credentialsValue":"pem",)"
                               R"("status":"SUCCESS"})")
                .verdict,
            Verdict::Unexpected);
}
