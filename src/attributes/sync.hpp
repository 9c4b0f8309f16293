// The agent's attribute exchange with ThingsBoard (docs/attributes.md):
//  - client attributes: publish() POSTs the keys whose value changed since the server last
//    acknowledged them (nothing when nothing changed), retrying with backoff on failure;
//  - shared attributes: a GET at start (and after every re-registration that followed an end)
//    and an observation kept alive by coap::Subscription; every update goes to on_update, a
//    full state (GET answer or first notification) flagged so keys it lacks count as deleted.
// Hostile or broken payloads are logged and nothing of them is applied.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "attributes/codec.hpp"
#include "coap/client.hpp"
#include "coap/subscription.hpp"
#include "util/backoff.hpp"
#include "util/timer.hpp"

namespace tb::attributes {

struct SyncOptions {
  std::string token;
  Millis reregister_interval = std::chrono::minutes(2);
};

class Sync {
 public:
  // on_update(update, full): full = the whole shared state (keys it lacks are gone).
  // on_state(text): the shared-attribute observation's state, for D-Bus.
  Sync(sd_event* loop, coap::Client& client, coap::Observer& observer, SyncOptions options,
       std::function<void(const SharedUpdate&, bool full)> on_update,
       std::function<void()> on_state);
  ~Sync();
  Sync(const Sync&) = delete;
  Sync& operator=(const Sync&) = delete;

  void start();
  // Publishes `attributes` (all client attributes as they are now); sends only what changed.
  void publish(const nlohmann::json& attributes);
  // Registers the observation again now and resyncs (a network change, a reload).
  void renew();

  // "registering", "observing", "retrying in 4s: …"
  const std::string& observation_state() const { return subscription_.state(); }
  // The last problem with shared attributes ("" = none): a refused payload, a failed GET.
  const std::string& last_error() const { return last_error_; }

 private:
  void get_shared();
  void on_notification(const coap::Notification& n);
  void send_pending();

  coap::Client& client_;
  SyncOptions options_;
  std::function<void(const SharedUpdate&, bool)> on_update_;
  std::function<void()> on_state_;
  coap::Subscription subscription_;
  nlohmann::json acknowledged_ = nlohmann::json::object();  // what the server has
  nlohmann::json wanted_ = nlohmann::json::object();        // what it should have
  coap::RequestId post_in_flight_ = 0;
  coap::RequestId get_in_flight_ = 0;
  bool resync_on_first_ = false;
  Backoff backoff_;
  Timer retry_timer_;
  std::string last_error_;
};

}  // namespace tb::attributes
