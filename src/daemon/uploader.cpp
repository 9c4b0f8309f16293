#include "daemon/uploader.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>

#include "util/units.hpp"

namespace tb::daemon {

namespace {

// After this many single records in a row are refused with 4.00, the server is refusing
// everything (e.g. an Efento profile answers 4.00 to every /api/v1 request, §0) and dropping on
// would throw the whole queue away: keep the data and retry instead.
constexpr unsigned kMaxConsecutiveDrops = 3;

}  // namespace

const char* delivery_state_name(DeliveryState s) {
  switch (s) {
    case DeliveryState::Idle:
      return "idle";
    case DeliveryState::Retrying:
      return "retrying";
    case DeliveryState::Unauthorized:
      return "unauthorized";
  }
  return "?";
}

Uploader::Uploader(sd_event* loop, telemetry::Queue& queue, config::DeliveryConfig delivery,
                   double drain_rate, Callbacks callbacks)
    : queue_(queue),
      delivery_(delivery),
      drain_rate_(drain_rate),
      callbacks_(std::move(callbacks)),
      backoff_(delivery.backoff_initial, delivery.backoff_max),
      send_timer_(
          loop, [this] { send_next(); }, Millis(1), CLOCK_MONOTONIC) {}

Uploader::~Uploader() { pause(); }

void Uploader::start(coap::Client* client, std::string token) {
  client_ = client;
  token_ = std::move(token);
  backoff_.reset();
  set_state(DeliveryState::Idle, "");
  send_timer_.arm_in(Millis(0));
}

void Uploader::kick() {
  if (!client_ || in_flight_ || send_timer_.armed() || state_ != DeliveryState::Idle) return;
  send_timer_.arm_in(delivery_.flush_interval);
}

void Uploader::flush_now() {
  if (!client_ || in_flight_) return;
  send_timer_.disarm();
  send_next();
}

void Uploader::pause() {
  send_timer_.disarm();
  ++generation_;
  if (in_flight_) {
    const auto id = in_flight_;
    in_flight_ = 0;
    queue_.release(batch_);
    batch_ = {};
    if (client_) client_->cancel(id);
  }
}

void Uploader::set_client(coap::Client* client) {
  pause();
  client_ = client;
  if (client_) send_timer_.arm_in(Millis(0));
}

void Uploader::reconfigure(const config::DeliveryConfig& delivery, double drain_rate) {
  delivery_ = delivery;
  drain_rate_ = drain_rate;
  backoff_.configure(delivery.backoff_initial, delivery.backoff_max);
}

Millis Uploader::rate_delay(std::uint64_t readings) const {
  if (!(drain_rate_ > 0)) return Millis(0);  // 0 = unlimited (NaN too, defensively)
  // Clamped in double before the conversion: a huge quotient (a tiny rate, a big batch) does not
  // fit an int64 and converting it would be undefined behaviour. The config allows rates down to
  // 0.001/s; a pause longer than a day is capped there.
  constexpr double kMaxPauseMs = 24.0 * 3600 * 1000;
  const double ms = 1000.0 * static_cast<double>(readings) / drain_rate_;
  return Millis(static_cast<std::int64_t>(std::min(ms, kMaxPauseMs)));
}

void Uploader::send_next() {
  if (!client_ || in_flight_) return;
  // In single-record mode next_batch(1) still hands out exactly one record.
  batch_ = queue_.next_batch(single_record_mode_ ? 1 : delivery_.max_batch_size);
  if (batch_.empty()) {
    if (state_ == DeliveryState::Retrying) set_state(DeliveryState::Idle, "");
    return;
  }
  // A generation number tells a late callback of a paused request from the current one.
  const std::uint64_t generation = ++generation_;
  in_flight_ = client_->request(coap::Method::Post, {"api", "v1", token_, "telemetry"},
                                batch_.payload, [this, generation](const coap::Outcome& o) {
                                  if (generation == generation_) on_outcome(o);
                                });
}

void Uploader::on_outcome(const coap::Outcome& outcome) {
  if (!in_flight_) return;  // paused meanwhile: the batch was already released
  in_flight_ = 0;
  telemetry::Batch batch = std::move(batch_);
  batch_ = {};
  std::string err;

  // docs/thingsboard-coap.md §1: telemetry is stored when the server answers 2.01 Created, and
  // only then.
  if (outcome.answered() && outcome.response->code == 201) {
    if (!queue_.ack(batch, &err)) {
      // A local fault (the state disk is full, read-only, ...): the server has the batch but the
      // queue still holds it. Sending on at once would resend it in a storm; counting it would
      // count it again when it is resent. So: keep it queued, count nothing, back off like any
      // failure and resend later (at-least-once: same ts, ThingsBoard overwrites the point).
      queue_.release(batch);
      if (!ack_failing_)
        spdlog::error(
            "delivered {} reading(s), but cannot remove them from the queue ({}); they stay "
            "queued and will be sent again with the same timestamps once the queue can be "
            "written; delivery pauses until then",
            batch.readings, err);
      ack_failing_ = true;
      const Millis delay = backoff_.next();
      set_state(DeliveryState::Retrying, "cannot remove delivered readings from the queue: " + err,
                delay, /*log=*/false);
      send_timer_.arm_in(delay);
      return;
    }
    if (ack_failing_) {
      spdlog::info("removing delivered readings from the queue works again");
      ack_failing_ = false;
    }
    consecutive_drops_ = 0;
    settle_suspect();
    backoff_.reset();
    if (callbacks_.delivered) callbacks_.delivered(batch.readings);
    set_state(DeliveryState::Idle, "");
    // Draining a backlog: go on at once (we run from the client's dispatcher, not inside libcoap,
    // so a new request is fine here); a timer only when drain_rate asks for a pause.
    if (const Millis pause = rate_delay(batch.readings); pause.count() > 0)
      send_timer_.arm_in(pause);
    else
      send_next();
    return;
  }

  if (outcome.answered() && outcome.response->code / 100 == 2) {
    // Any other 2.xx is not ThingsBoard's answer to telemetry: keep the readings and retry.
    queue_.release(batch);
    retry("protocol error: server answered " + coap::code_string(outcome.response->code) +
          " to telemetry, expected 2.01 Created; readings kept");
    return;
  }

  if (outcome.answered() && outcome.response->code == 400) {
    if (batch.ids.size() > 1) {
      // Which record does the server refuse? Send them one at a time to find out.
      spdlog::warn("server refused a batch of {} records (4.00); sending them one by one",
                   batch.ids.size());
      queue_.release(batch);
      single_record_mode_ = true;
      suspects_left_ = batch.ids.size();
      send_timer_.arm_in(Millis(0));
      return;
    }
    if (consecutive_drops_ >= kMaxConsecutiveDrops) {
      queue_.release(batch);
      retry(
          "server refuses every payload (4.00); keeping the data — check the device profile "
          "(it must use the DEFAULT or COAP transport with JSON payloads)");
      return;
    }
    ++consecutive_drops_;
    if (!queue_.drop(batch, &err)) spdlog::error("cannot drop a refused record: {}", err);
    spdlog::error("server refused a record (4.00): dropped {} reading(s): {}", batch.readings,
                  batch.payload.size() > 200 ? batch.payload.substr(0, 200) + "…" : batch.payload);
    if (callbacks_.dropped) callbacks_.dropped(batch.readings);
    settle_suspect();
    send_timer_.arm_in(Millis(0));
    return;
  }

  if (outcome.answered() && outcome.response->code == 413 && batch.ids.size() > 1) {
    // 4.13: "reduce the body" (docs/thingsboard-coap.md, recommendations). Resending the same
    // batch would be refused forever; one record at a time is the smallest body we can send.
    spdlog::warn(
        "server refused a batch of {} records as too large (4.13); sending them one by one",
        batch.ids.size());
    queue_.release(batch);
    single_record_mode_ = true;
    suspects_left_ = batch.ids.size();
    send_timer_.arm_in(Millis(0));
    return;
  }
  queue_.release(batch);
  if (outcome.answered() && outcome.response->code == 401) {
    const std::string msg =
        "server rejected the access token (4.01): sending stopped, readings are kept; fix the "
        "device's credentials, then reload or call Flush()";
    spdlog::error("{}", msg);
    set_state(DeliveryState::Unauthorized, msg, delivery_.backoff_max);
    // Probe rarely: the token may be restored on the server side.
    send_timer_.arm_in(delivery_.backoff_max);
    return;
  }
  retry(coap::describe(outcome));
}

void Uploader::settle_suspect() {
  if (single_record_mode_ && (suspects_left_ == 0 || --suspects_left_ == 0))
    single_record_mode_ = false;
}

void Uploader::retry(const std::string& why) {
  const Millis delay = backoff_.next();
  set_state(DeliveryState::Retrying, why, delay);
  send_timer_.arm_in(delay);
}

void Uploader::set_state(DeliveryState s, const std::string& error, Millis retry_in, bool log) {
  const bool changed = s != state_ || error != last_error_;
  state_ = s;
  last_error_ = error;
  if (s == DeliveryState::Retrying && log)
    spdlog::warn("delivery failed ({}); retrying in {}", error, format_duration(retry_in));
  if ((changed || s == DeliveryState::Retrying) && callbacks_.state_changed)
    callbacks_.state_changed({s, error, retry_in});
}

}  // namespace tb::daemon
