// Keeps one observation of a path alive on an Observer (docs/coap.md "Observe", docs/attributes.md
// "Keeping observations alive"): registers; registers again with a fresh token every
// `reregister_interval` (a server restart is silent for an observer and NAT bindings expire,
// docs/thingsboard-coap.md §7; this doubles as the keep-alive) and cancels the older registration
// once the newer is answered; after an end (2.02, an error, no answer, a network failure) it
// registers again after a backoff. The server ending a registration already replaced is no reason
// to register again.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include <systemd/sd-event.h>

#include "coap/observer.hpp"
#include "util/backoff.hpp"
#include "util/timer.hpp"

namespace tb::coap {

struct SubscriptionOptions {
  Millis reregister_interval = std::chrono::minutes(2);
  Millis retry_initial = std::chrono::seconds(1);
  Millis retry_max = std::chrono::minutes(1);
};

class Subscription {
 public:
  // on_notification: every fresh notification of the live registration, `first` for the answer
  // to a registration (the owner resyncs then). on_state: "registering", "observing",
  // "retrying in 4s: why" (for logs and D-Bus). `what` names it in logs ("shared attributes").
  Subscription(sd_event* loop, Observer& observer, std::vector<std::string> path, std::string what,
               SubscriptionOptions options,
               std::function<void(const Notification&)> on_notification,
               std::function<void(const std::string&)> on_state);
  ~Subscription();
  Subscription(const Subscription&) = delete;
  Subscription& operator=(const Subscription&) = delete;

  void start();
  void stop();
  // Register again now with a fresh token (a network change, a reload).
  void renew();
  const std::string& state() const { return state_; }
  // Registrations made (first and every renewal), for tests and logs.
  unsigned registrations() const { return registrations_; }

 private:
  void register_now();
  void on_server_answered();
  void on_note(ObservationId id, const Notification& n);
  void on_end(ObservationId id, const ObservationEnd& e);
  void set_state(std::string s);

  Observer& observer_;
  std::vector<std::string> path_;
  std::string what_;
  SubscriptionOptions options_;
  std::function<void(const Notification&)> on_notification_;
  std::function<void(const std::string&)> on_state_;
  Backoff backoff_;
  Timer refresh_timer_;
  Timer retry_timer_;
  Observer::ListenerId answer_listener_ = 0;
  ObservationId live_ = 0;     // the registration notifications come from
  ObservationId pending_ = 0;  // a newer one waiting for its first answer
  bool running_ = false;
  unsigned registrations_ = 0;
  std::string state_ = "stopped";
};

}  // namespace tb::coap
