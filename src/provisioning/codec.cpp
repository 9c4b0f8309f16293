#include "provisioning/codec.hpp"

#include <nlohmann/json.hpp>

namespace tb::provisioning {

using nlohmann::json;

std::string encode_request(const Request& r) {
  json j = {{"provisionDeviceKey", r.key},
            {"provisionDeviceSecret", r.secret},
            {"deviceName", r.device_name},
            {"credentialsType", r.certificate.empty() ? "ACCESS_TOKEN" : "X509_CERTIFICATE"}};
  if (!r.certificate.empty()) {
    j["hash"] = r.certificate;
  } else if (!r.token.empty()) {
    j["token"] = r.token;
  }
  // The config refuses non-UTF-8 text, so nothing is replaced in practice; but dump() would
  // throw (type_error.316) on a bad byte, and an exception is no way to fail a request.
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

Answer decode_answer(int code, const std::string& payload) {
  Answer a;
  const json j = json::parse(payload, nullptr, /*allow_exceptions=*/false);
  const bool obj = j.is_object();
  auto str = [&](const char* key) {
    if (!obj) return std::string();
    auto it = j.find(key);
    return (it != j.end() && it->is_string()) ? it->get<std::string>() : std::string();
  };
  const std::string status = str("status");
  a.error_message = str("errorMsg");

  if (code / 100 == 5) {
    a.verdict = Verdict::Retryable;
    if (a.error_message.empty()) a.error_message = "server error";
    return a;
  }
  if (code == 201 && status == "SUCCESS") {
    a.credentials_type = str("credentialsType");
    a.credentials_value = str("credentialsValue");
    // X509_CERTIFICATE: the device is the one of our certificate; the value (the PEM) is not
    // needed to use it. A pre-provisioned device may answer with its existing ACCESS_TOKEN
    // whatever we asked for (§4.3): that is used as it comes.
    const bool x509 = a.credentials_type == "X509_CERTIFICATE";
    if (!x509 && (a.credentials_type != "ACCESS_TOKEN" || a.credentials_value.empty())) {
      a.verdict = Verdict::Unexpected;
      a.error_message = "the server answered SUCCESS without an access token (credentialsType '" +
                        a.credentials_type + "')";
      return a;
    }
    a.verdict = Verdict::Success;
    return a;
  }
  if (code == 400) {
    if (status == "NOT_FOUND") {
      a.verdict = Verdict::NotFound;
    } else if (status == "FAILURE") {
      a.verdict = Verdict::Failure;
    } else {
      a.verdict = Verdict::BadRequest;
      if (a.error_message.empty()) a.error_message = "the server could not read the request";
    }
    return a;
  }
  a.verdict = Verdict::Unexpected;
  if (a.error_message.empty()) a.error_message = "unexpected answer";
  return a;
}

const char* verdict_name(Verdict v) {
  switch (v) {
    case Verdict::Success:
      return "SUCCESS";
    case Verdict::NotFound:
      return "NOT_FOUND";
    case Verdict::Failure:
      return "FAILURE";
    case Verdict::BadRequest:
      return "BAD_REQUEST";
    case Verdict::Retryable:
      return "RETRYABLE";
    case Verdict::Unexpected:
      return "UNEXPECTED";
  }
  return "?";
}

}  // namespace tb::provisioning
