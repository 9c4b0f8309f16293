// ThingsBoard's provisioning request and answer (docs/thingsboard-coap.md §4), as a pure codec.
#pragma once

#include <string>

namespace tb::provisioning {

struct Request {
  std::string key;          // provisionDeviceKey
  std::string secret;       // provisionDeviceSecret
  std::string device_name;  // deviceName
  std::string token;        // the access token we propose (credentialsType ACCESS_TOKEN)
  std::string certificate;  // or the PEM certificate we propose (credentialsType X509_CERTIFICATE)
};

// {"provisionDeviceKey":…,"provisionDeviceSecret":…,"deviceName":…,
//  "credentialsType":"ACCESS_TOKEN","token":…}, or with a certificate
//  "credentialsType":"X509_CERTIFICATE","hash":"-----BEGIN CERTIFICATE-----…" (§4.1: despite its
//  name, `hash` carries the PEM text; the server hashes it itself)
std::string encode_request(const Request& request);

enum class Verdict {
  Success,     // 2.01 {"status":"SUCCESS",...}
  NotFound,    // 4.00 {"status":"NOT_FOUND"}: wrong key/secret or provisioning disabled
  Failure,     // 4.00 {"status":"FAILURE"}: name taken, already provisioned, token in use, ...
  BadRequest,  // 4.00 with no status: the server could not read our request — not retryable
  Retryable,   // 5.xx: core down, slow or rate limited — retry with backoff
  Unexpected,  // anything else: not ThingsBoard's provisioning API (wrong host or path)
};

struct Answer {
  Verdict verdict = Verdict::Unexpected;
  std::string credentials_type;   // on Success
  std::string credentials_value;  // on Success: the token to use (X.509: the certificate, if any)
  std::string error_message;      // errorMsg, or our description
};

// Decodes the answer. The body is JSON labelled text/plain (Content-Format 0), so it is parsed as
// JSON whatever its Content-Format says (§4.2, recommendation 6).
Answer decode_answer(int code, const std::string& payload);

const char* verdict_name(Verdict v);

}  // namespace tb::provisioning
