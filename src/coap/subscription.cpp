#include "coap/subscription.hpp"

#include <spdlog/spdlog.h>

#include <memory>
#include <utility>

#include "util/units.hpp"

namespace tb::coap {

Subscription::Subscription(sd_event* loop, Observer& observer, std::vector<std::string> path,
                           std::string what, SubscriptionOptions options,
                           std::function<void(const Notification&)> on_notification,
                           std::function<void(const std::string&)> on_state)
    : observer_(observer),
      path_(std::move(path)),
      what_(std::move(what)),
      options_(options),
      on_notification_(std::move(on_notification)),
      on_state_(std::move(on_state)),
      backoff_(options.retry_initial, options.retry_max),
      refresh_timer_(
          loop, [this] { register_now(); }, Millis(1000)),
      retry_timer_(
          loop, [this] { register_now(); }, Millis(100)) {
  answer_listener_ = observer_.add_answer_listener([this] { on_server_answered(); });
}

Subscription::~Subscription() {
  stop();
  observer_.remove_answer_listener(answer_listener_);
}

void Subscription::start() {
  if (running_) return;
  running_ = true;
  register_now();
}

void Subscription::stop() {
  running_ = false;
  refresh_timer_.disarm();
  retry_timer_.disarm();
  // Forgotten: later notifications get RST, which ends them on the server.
  if (live_) observer_.cancel(live_);
  if (pending_) observer_.cancel(pending_);
  live_ = pending_ = 0;
  state_ = "stopped";
}

void Subscription::renew() {
  if (!running_) return;
  retry_timer_.disarm();
  if (pending_) observer_.cancel(pending_);
  pending_ = 0;
  register_now();
}

void Subscription::set_state(std::string s) {
  if (s == state_) return;
  state_ = std::move(s);
  if (on_state_) on_state_(state_);
}

void Subscription::register_now() {
  if (!running_ || pending_) return;
  ++registrations_;
  // Callbacks never run inside observe(), so the id is known before any of them needs it.
  auto id = std::make_shared<ObservationId>(0);
  *id = observer_.observe(
      path_, [this, id](const Notification& n) { on_note(*id, n); },
      [this, id](const ObservationEnd& e) { on_end(*id, e); });
  pending_ = *id;
  if (!live_) set_state("registering");
}

// Another registration on the same Observer was just answered: the server is reachable again.
// After an outage every subscription waits out its own jittered backoff (up to retry_max), so
// without this the RPC observation could come back a minute after the attributes one, and RPCs
// sent meanwhile would go to the registration lost in the outage.
void Subscription::on_server_answered() {
  if (!running_ || !retry_timer_.armed()) return;
  retry_timer_.disarm();
  spdlog::info("{}: the server answers again; registering now", what_);
  register_now();
}

void Subscription::on_note(ObservationId id, const Notification& n) {
  if (id == pending_) {
    if (!n.first) return;
    if (live_) observer_.cancel(live_);
    live_ = id;
    pending_ = 0;
    backoff_.reset();
    refresh_timer_.arm_in(options_.reregister_interval);
    set_state("observing");
  } else if (id != live_) {
    return;
  }
  if (on_notification_) on_notification_(n);
}

void Subscription::on_end(ObservationId id, const ObservationEnd& e) {
  if (id == pending_) {
    pending_ = 0;
  } else if (id == live_) {
    live_ = 0;
    if (pending_) return;  // already being replaced: no reason to register again
  } else {
    return;
  }
  if (!running_ || live_) {
    // A renewal failed while the older registration still stands: try again at the next
    // interval, sooner if the older one ends too.
    if (running_) refresh_timer_.arm_in(backoff_.next());
    return;
  }
  const Millis delay = backoff_.next();
  spdlog::warn("{}: observation {}{}; registering again in {}", what_, to_string(e.reason),
               e.error.empty() ? "" : " (" + e.error + ")", format_duration(delay));
  set_state("retrying in " + format_duration(delay) + ": " + to_string(e.reason));
  refresh_timer_.disarm();
  retry_timer_.arm_in(delay);
}

}  // namespace tb::coap
