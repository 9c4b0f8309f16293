#include "attributes/sync.hpp"

#include <spdlog/spdlog.h>

#include <utility>

#include "credentials/credentials.hpp"
#include "util/units.hpp"

namespace tb::attributes {

using nlohmann::json;

Sync::Sync(sd_event* loop, coap::Client& client, coap::Observer& observer, SyncOptions options,
           std::function<void(const SharedUpdate&, bool)> on_update, std::function<void()> on_state)
    : client_(client),
      options_(std::move(options)),
      on_update_(std::move(on_update)),
      on_state_(std::move(on_state)),
      subscription_(
          loop, observer, credentials::api_path(options_.token, "attributes"), "shared attributes",
          coap::SubscriptionOptions{options_.reregister_interval},
          [this](const coap::Notification& n) { on_notification(n); },
          [this](const std::string& state) {
            // After an end the next answered registration resyncs with a GET (§2.3: updates
            // may have been lost meanwhile).
            if (state.rfind("retrying", 0) == 0) resync_on_first_ = true;
            if (on_state_) on_state_();
          }),
      backoff_(Millis(1000), Millis(60'000)),
      retry_timer_(
          loop, [this] { send_pending(); }, Millis(100)) {}

Sync::~Sync() {
  if (post_in_flight_) client_.cancel(post_in_flight_);
  if (get_in_flight_) client_.cancel(get_in_flight_);
}

void Sync::start() {
  get_shared();
  subscription_.start();
}

void Sync::renew() {
  resync_on_first_ = true;
  subscription_.renew();
}

void Sync::get_shared() {
  if (get_in_flight_) return;
  // §2.2: without a key list the answer holds every client and shared attribute.
  get_in_flight_ = client_.request(
      coap::Method::Get, credentials::api_path(options_.token, "attributes"), "",
      [this](const coap::Outcome& o) {
        get_in_flight_ = 0;
        if (!o.answered()) {
          spdlog::warn("shared attributes: cannot read them: {}", coap::describe(o));
          return;
        }
        if (o.response->code == 404) {  // §2.2: nothing stored, not an error
          on_update_(SharedUpdate{}, true);
          return;
        }
        if (o.response->code != 205) {
          last_error_ = "reading shared attributes: " + coap::describe(o);
          spdlog::warn("shared attributes: {}", last_error_);
          return;
        }
        std::string error;
        auto u = parse_get_answer(o.response->payload, &error);
        if (!u) {
          last_error_ = "shared attributes refused: " + error;
          spdlog::warn("{}; nothing applied", last_error_);
          return;
        }
        on_update_(*u, true);
      });
}

void Sync::on_notification(const coap::Notification& n) {
  if (n.incomplete) {
    // Too big for one notification: read the whole state instead (GET, Block2, bounded).
    spdlog::warn("shared attributes: notification too large; reading them with a GET");
    get_shared();
    return;
  }
  std::string error;
  auto u = parse_notification(n.payload, &error);
  if (!u) {
    last_error_ = "shared attributes notification refused: " + error;
    spdlog::warn("{}; nothing applied", last_error_);
    if (on_state_) on_state_();
    return;
  }
  // §2.3: the first answer holds every shared attribute.
  on_update_(*u, n.first);
  if (n.first && resync_on_first_) {
    resync_on_first_ = false;
    get_shared();
  }
}

void Sync::publish(const json& attributes) {
  wanted_ = attributes;
  send_pending();
}

void Sync::send_pending() {
  if (post_in_flight_ || retry_timer_.armed()) return;
  json diff = changed_attributes(acknowledged_, wanted_);
  if (diff.empty()) return;
  post_in_flight_ =
      client_.request(coap::Method::Post, credentials::api_path(options_.token, "attributes"),
                      diff.dump(), [this, diff](const coap::Outcome& o) {
                        post_in_flight_ = 0;
                        if (o.answered() && o.response->code / 100 == 2) {
                          for (auto it = diff.begin(); it != diff.end(); ++it)
                            acknowledged_[it.key()] = it.value();
                          backoff_.reset();
                          spdlog::info("client attributes published: {}", diff.size());
                          send_pending();  // whatever changed meanwhile
                          return;
                        }
                        const Millis delay = backoff_.next();
                        spdlog::warn("client attributes not published ({}); again in {}",
                                     coap::describe(o), format_duration(delay));
                        retry_timer_.arm_in(delay);
                      });
}

}  // namespace tb::attributes
