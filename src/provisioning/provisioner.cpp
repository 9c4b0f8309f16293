#include "provisioning/provisioner.hpp"

#include <spdlog/spdlog.h>

#include "provisioning/codec.hpp"
#include "util/clock.hpp"
#include "util/fs.hpp"
#include "util/units.hpp"

namespace tb::provisioning {

Provisioner::Provisioner(sd_event* loop, coap::Client& client, Options options,
                         std::function<void(const Result&)> done,
                         std::function<void(const std::string&)> progress)
    : client_(client),
      options_(std::move(options)),
      done_(std::move(done)),
      progress_(std::move(progress)),
      backoff_(options_.backoff_initial, options_.backoff_max),
      retry_timer_(loop, [this] { verifying_ ? verify_token() : send_request(); }) {}

Provisioner::~Provisioner() {
  if (in_flight_) client_.cancel(in_flight_);
}

void Provisioner::start() {
  std::string err;
  const bool x509 = !options_.certificate_file.empty();
  if (x509) {
    auto pem = read_file(options_.certificate_file, &err);
    if (!pem || pem->empty()) {
      fail("cannot read the certificate to provision with, " + options_.certificate_file.string() +
           ": " + (err.empty() ? std::string("missing or empty") : err));
      return;
    }
    certificate_ = std::move(*pem);
  }
  auto pending = credentials::load_pending(options_.state_dir, &err);
  if (pending && !err.empty()) spdlog::warn("provisioning record: {}", err);
  if (pending && pending->device_name == options_.device_name && pending->x509 != x509) {
    spdlog::info("provisioning credentials type changed to {}: starting provisioning afresh",
                 x509 ? "X509_CERTIFICATE" : "ACCESS_TOKEN");
    pending.reset();
    pending_ = {};
    pending_.device_name = options_.device_name;
    pending_.x509 = x509;
    if (!x509) pending_.token = credentials::generate_token();
    pending_.first_attempt_ms = wall_ms();
  } else if (pending && pending->device_name == options_.device_name) {
    pending_ = *pending;
    spdlog::info(
        "resuming provisioning of device '{}' ({} request(s) sent before; the proposed token "
        "is kept so a lost answer can be recovered)",
        pending_.device_name, pending_.attempts);
  } else {
    // Ignoring it proposes a fresh token. If an earlier request did register the device, the
    // server answers FAILURE to the first new request and the agent stops in state `failed`
    // (it never provisions the device twice): the operator resolves it.
    if (!pending && !err.empty())
      spdlog::warn(
          "ignoring unreadable provisioning record: {}; proposing a new token (if an earlier "
          "request registered the device, the server refuses this one and provisioning stops "
          "for the operator)",
          err);
    if (pending)
      spdlog::info("device name changed from '{}' to '{}': starting provisioning afresh",
                   pending->device_name, options_.device_name);
    pending_ = {};
    pending_.device_name = options_.device_name;
    pending_.x509 = x509;
    if (!x509) pending_.token = credentials::generate_token();
    pending_.first_attempt_ms = wall_ms();
  }
  send_request();
}

void Provisioner::retry_now() {
  if (retry_timer_.armed()) {
    retry_timer_.disarm();
    verifying_ ? verify_token() : send_request();
  }
}

void Provisioner::send_request() {
  // Count the attempt on disk before sending: after a crash we must know a request may have
  // reached the server, or a FAILURE would look final when our token is in fact registered.
  ++pending_.attempts;
  std::string err;
  if (!credentials::save_pending(options_.state_dir, pending_, &err)) {
    fail("cannot store the provisioning state: " + err);
    return;
  }
  progress_("provisioning device '" + pending_.device_name + "'");
  spdlog::info("provisioning device '{}' (attempt {})", pending_.device_name, pending_.attempts);
  const std::string body =
      encode_request({options_.key, options_.secret, pending_.device_name, pending_.token,
                      pending_.x509 ? certificate_ : std::string()});
  in_flight_ = client_.request(coap::Method::Post, {"api", "v1", "provision"}, body,
                               [this](const coap::Outcome& o) {
                                 in_flight_ = 0;
                                 on_answer(o);
                               });
}

void Provisioner::on_answer(const coap::Outcome& outcome) {
  if (!outcome.answered()) {
    retry_later(coap::describe(outcome), false);
    return;
  }
  if (const int code = outcome.response->code; code / 100 == 2 && code != 201) {
    // §4.2: success is 2.01; another 2.xx is a protocol error, not a refusal. Retry.
    retry_later("protocol error: server answered " + coap::code_string(code) +
                    " to the provisioning request, expected 2.01 Created",
                false);
    return;
  }
  const Answer a = decode_answer(outcome.response->code, outcome.response->payload);
  if (outcome.response->code == 201 && a.verdict != Verdict::Success) {
    // A 2.01 we cannot read (cut short, garbled on the way): the server has most likely created
    // the device, so this is a lost answer, not a refusal. The retry gets FAILURE and the token
    // check below settles it (§4.3; docs/testing.md "Fault suites").
    retry_later(
        "malformed provisioning answer (2.01: " + a.error_message + "); treating it as lost",
        false);
    return;
  }
  switch (a.verdict) {
    case Verdict::Success:
      if (a.credentials_type == credentials::kX509Certificate && !pending_.x509) {
        // The device's credential is a certificate we do not hold (a pre-provisioned device,
        // §4.3): nothing this agent can identify itself with.
        fail(
            "provisioning answered SUCCESS with an X509_CERTIFICATE credential, but the agent "
            "proposed an access token: set provisioning.credentials_type: x509_certificate "
            "with the device's certificate in server.dtls, or give the device a token");
        return;
      }
      succeed({a.credentials_type, a.credentials_value, pending_.device_name});
      return;
    case Verdict::Retryable:
      retry_later(coap::describe(outcome), false);
      return;
    case Verdict::NotFound:
      fail("provisioning refused (NOT_FOUND: " + a.error_message +
           "): the provision key or secret is wrong, or provisioning is disabled in the device "
           "profile");
      return;
    case Verdict::Failure:
      if (pending_.attempts > 1) {
        // An earlier request may have succeeded with its answer lost (§4.3): check our token.
        spdlog::warn(
            "provisioning answered FAILURE after {} attempts; checking whether an earlier "
            "attempt registered our proposed {}",
            pending_.attempts, pending_.x509 ? "certificate" : "token");
        backoff_.reset();
        verify_token();
        return;
      }
      fail("provisioning refused (FAILURE: " + a.error_message + "): a device named '" +
           pending_.device_name +
           "' already exists or was already provisioned; choose another device.name or ask "
           "the ThingsBoard administrator");
      return;
    case Verdict::BadRequest:
    case Verdict::Unexpected:
      fail("provisioning failed: " + coap::describe(outcome) + " (" + a.error_message +
           "); is server.host a ThingsBoard CoAP endpoint?");
      return;
  }
}

void Provisioner::verify_token() {
  verifying_ = true;
  progress_(pending_.x509 ? "checking whether our certificate is registered"
                          : "checking the proposed access token");
  // X.509: ThingsBoard looked our certificate up when this session's handshake ran, perhaps
  // before the device existed (§6.2): ask on a fresh handshake.
  if (pending_.x509) client_.renew_session();
  in_flight_ =
      client_.request(coap::Method::Get, credentials::api_path(pending_.token, "attributes"), "",
                      [this](const coap::Outcome& o) {
                        in_flight_ = 0;
                        on_verify(o);
                      });
}

void Provisioner::on_verify(const coap::Outcome& outcome) {
  if (!outcome.answered()) {
    retry_later(coap::describe(outcome), true);
    return;
  }
  const int code = outcome.response->code;
  // 2.05: attributes returned; 4.04: the token is valid but no attributes exist (§2.2).
  if (code == 205 || code == 404) {
    spdlog::info("the proposed {} is registered: an earlier provisioning answer was lost",
                 pending_.x509 ? "certificate" : "token");
    if (pending_.x509)
      succeed({std::string(credentials::kX509Certificate), certificate_, pending_.device_name});
    else
      succeed({std::string(credentials::kAccessToken), pending_.token, pending_.device_name});
  } else if (code == 401 && pending_.x509) {
    fail("provisioning refused (FAILURE) and our certificate is not registered: device '" +
         pending_.device_name +
         "' exists already or was provisioned with other credentials; ask the ThingsBoard "
         "administrator to delete it or reset its provisionState");
  } else if (code == 401) {
    fail("provisioning refused (FAILURE) and the proposed token is not registered: device '" +
         pending_.device_name +
         "' exists already or was provisioned with other credentials; ask the ThingsBoard "
         "administrator to delete it or reset its provisionState, or set credentials.access_token");
  } else if (code / 100 == 5) {
    retry_later(coap::describe(outcome), true);
  } else if (code / 100 == 2) {
    retry_later("protocol error: server answered " + coap::code_string(code) +
                    " to the attribute request, expected 2.05 Content",
                true);
  } else {
    fail("cannot check the proposed token: " + coap::describe(outcome));
  }
}

void Provisioner::retry_later(const std::string& why, bool verifying) {
  verifying_ = verifying;
  const Millis delay = backoff_.next();
  const std::string msg = "provisioning: retrying in " + format_duration(delay) + ": " + why;
  spdlog::warn("{}", msg);
  progress_(msg);
  retry_timer_.arm_in(delay);
}

void Provisioner::succeed(credentials::Credentials credentials) {
  Result r;
  r.credentials = std::move(credentials);
  std::string err;
  if (!credentials::save(options_.state_dir, r.credentials, &err)) {
    // The server has registered the device; losing this token would need an operator. Keep the
    // pending record (it holds our token) and keep trying to store.
    spdlog::error("provisioned, but cannot store the credentials: {}", err);
    if (pending_.x509 ? r.credentials.x509() : r.credentials.value == pending_.token) {
      retry_later("cannot store the credentials: " + err, true);
      return;
    }
    fail("provisioned, but cannot store the credentials: " + err);
    return;
  }
  credentials::remove_pending(options_.state_dir);
  // Our handshake ran before the device existed, so ThingsBoard cached no identity for it
  // (§6.2): the token-less requests from now on start with a fresh one.
  if (r.credentials.x509()) client_.renew_session();
  spdlog::info("device '{}' provisioned; credentials stored in {}", pending_.device_name,
               (options_.state_dir / credentials::kCredentialsFile).string());
  r.ok = true;
  done_(r);
}

void Provisioner::fail(const std::string& error) {
  spdlog::error("{}", error);
  Result r;
  r.error = error;
  done_(r);
}

}  // namespace tb::provisioning
