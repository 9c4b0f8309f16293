// Provisions the device once over ThingsBoard's CoAP API (docs/thingsboard-coap.md §4).
//
// ThingsBoard's provisioning is not idempotent: if the success answer is lost, a retry answers
// FAILURE. So the agent proposes its own random access token and saves it (provisioning.json)
// before the first request; when a retry answers FAILURE, it asks the server whether that token
// works (GET attributes: 2.05 or 4.04 = the token is valid, 4.01 = it is not) before giving up.
// With X509_CERTIFICATE it proposes its certificate (server.dtls.cert_file) instead and checks
// the same way with a token-less GET, on a fresh DTLS session: ThingsBoard looks the certificate
// up only in the handshake (docs/thingsboard-coap.md §6.2).
#pragma once

#include <filesystem>
#include <functional>
#include <memory>
#include <string>

#include "coap/client.hpp"
#include "credentials/credentials.hpp"
#include "util/backoff.hpp"
#include "util/timer.hpp"

namespace tb::provisioning {

struct Options {
  std::string key;
  std::string secret;
  std::string device_name;
  std::filesystem::path state_dir;
  // Set: credentialsType X509_CERTIFICATE with this certificate (PEM file), else ACCESS_TOKEN.
  std::filesystem::path certificate_file;
  Millis backoff_initial{1000};
  Millis backoff_max{300000};
};

struct Result {
  bool ok = false;
  credentials::Credentials credentials;  // when ok (already saved to credentials.json)
  std::string error;                     // when !ok: what the operator must fix
};

class Provisioner {
 public:
  // progress(message) tells what is happening ("retrying in 4s: server answered 5.00").
  Provisioner(sd_event* loop, coap::Client& client, Options options,
              std::function<void(const Result&)> done,
              std::function<void(const std::string&)> progress);
  ~Provisioner();

  void start();
  // Skip a backoff wait (D-Bus Flush).
  void retry_now();

 private:
  void send_request();
  void on_answer(const coap::Outcome& outcome);
  void verify_token();
  void on_verify(const coap::Outcome& outcome);
  void retry_later(const std::string& why, bool verifying);
  void succeed(credentials::Credentials credentials);
  void fail(const std::string& error);

  coap::Client& client_;
  Options options_;
  std::function<void(const Result&)> done_;
  std::function<void(const std::string&)> progress_;
  credentials::PendingProvision pending_;
  Backoff backoff_;
  Timer retry_timer_;
  bool verifying_ = false;
  std::string certificate_;  // the PEM of certificate_file
  coap::RequestId in_flight_ = 0;
};

}  // namespace tb::provisioning
