// Answers as ThingsBoard sends them (docs/thingsboard-coap.md §4.2).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "provisioning/codec.hpp"

using namespace tb::provisioning;

TEST(ProvisioningCodec, RequestCarriesKeySecretNameAndOurToken) {
  const auto j = nlohmann::json::parse(encode_request({"K", "S", "pump-7", "tok", ""}));
  EXPECT_EQ(j["provisionDeviceKey"], "K");
  EXPECT_EQ(j["provisionDeviceSecret"], "S");
  EXPECT_EQ(j["deviceName"], "pump-7");
  EXPECT_EQ(j["credentialsType"], "ACCESS_TOKEN");
  EXPECT_EQ(j["token"], "tok");
}

// Issue 8 #6: a device name that is not UTF-8 made dump() throw type_error.316 (a restart loop).
TEST(ProvisioningCodec, RequestWithANonUtf8NameNeverThrows) {
  std::string body;
  ASSERT_NO_THROW(body = encode_request({"K", "S", "pump-\xE9", "tok", ""}));
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
  // SUCCESS for a credentials type CoAP cannot use (the provisioner refuses X509_CERTIFICATE
  // when it proposed a token).
  EXPECT_EQ(decode_answer(201, R"({"credentialsType":"MQTT_BASIC","credentialsValue":"pem",)"
                               R"("status":"SUCCESS"})")
                .verdict,
            Verdict::Unexpected);
}

// Issue 11: X509_CERTIFICATE carries the PEM in `hash` (§4.1) and no token.
TEST(ProvisioningCodec, X509RequestCarriesThePemInHash) {
  const std::string pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
  const auto j = nlohmann::json::parse(encode_request({"K", "S", "pump-7", "", pem}));
  EXPECT_EQ(j["credentialsType"], "X509_CERTIFICATE");
  EXPECT_EQ(j["hash"], pem);
  EXPECT_FALSE(j.contains("token"));
}

TEST(ProvisioningCodec, X509SuccessIsAccepted) {
  auto a = decode_answer(
      201,
      R"({"credentialsValue":"-----BEGIN CERTIFICATE-----","credentialsType":"X509_CERTIFICATE","status":"SUCCESS"})");
  EXPECT_EQ(a.verdict, Verdict::Success);
  EXPECT_EQ(a.credentials_type, "X509_CERTIFICATE");
}
