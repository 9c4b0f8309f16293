#include "daemon/uploader.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>

#include "credentials/credentials.hpp"
#include "util/units.hpp"

namespace tb::daemon {

namespace {

// After this many single records in a row are refused with 4.00, the server is refusing
// everything (e.g. an Efento profile answers 4.00 to every /api/v1 request, §0) and dropping on
// would throw the whole queue away: keep the data and retry instead.
constexpr unsigned kMaxConsecutiveDrops = 3;

// RFC 7252 §4.8 ACK_TIMEOUT: an exchange that took longer had a datagram retransmitted, or a
// server that answered late (ThingsBoard answers separately after 500 ms, §6.4): either way a
// sign to send less (RFC 8085 §3.1.3).
constexpr Millis kSlowExchange = std::chrono::seconds(2);

// docs/thingsboard-coap.md §1: a payload over 1024 bytes goes with Block1.
constexpr std::size_t kOneDatagramPayload = 1024;

// Delivered batches acked together at most (one SQLite transaction). The window bounds how many
// answers one wake-up brings; this bounds the rest (answers arriving as fast as they are taken).
constexpr std::size_t kMaxCoalescedAcks = 64;

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
          loop, [this] { send_next(); }, Millis(1), CLOCK_MONOTONIC) {
  threshold_ = delivery_.max_in_flight;
  // Idle priority: runs once no other source is pending, i.e. after every answer this wake-up
  // brought has been dispatched. Without it acks are simply not coalesced (flushed at once).
  if (sd_event_add_defer(loop, &ack_source_, &Uploader::on_ack_flush, this) >= 0) {
    sd_event_source_set_priority(ack_source_, SD_EVENT_PRIORITY_IDLE);
    sd_event_source_set_enabled(ack_source_, SD_EVENT_OFF);
  } else {
    ack_source_ = nullptr;
  }
}

Uploader::~Uploader() {
  // Delivered batches still go out of the queue; the owner may be half torn down: no callbacks.
  flush_acks(/*notify=*/false);
  pause();
  sd_event_source_disable_unref(ack_source_);
}

int Uploader::on_ack_flush(sd_event_source*, void* userdata) noexcept {
  try {
    static_cast<Uploader*>(userdata)->flush_acks();
  } catch (const std::exception& e) {
    spdlog::error("delivery: acking delivered readings failed: {}", e.what());
  } catch (...) {
    spdlog::error("delivery: acking delivered readings failed");
  }
  return 0;
}

void Uploader::start(coap::Client* client, std::string token) {
  client_ = client;
  token_ = std::move(token);
  auth_retried_ = false;
  backoff_.reset();
  window_ = 1;
  threshold_ = delivery_.max_in_flight;
  set_state(DeliveryState::Idle, "");
  send_timer_.arm_in(Millis(0));
}

void Uploader::kick() {
  if (!client_ || !in_flight_.empty() || send_timer_.armed() || state_ != DeliveryState::Idle)
    return;
  send_timer_.arm_in(delivery_.flush_interval);
}

void Uploader::flush_now() {
  if (!client_) return;
  send_timer_.disarm();
  send_next();
}

void Uploader::pause() {
  flush_acks();  // those were delivered: a new client or server changes nothing about them
  send_timer_.disarm();
  ++generation_;
  auto flights = std::move(in_flight_);
  in_flight_.clear();
  busy_points_.clear();
  busy_lanes_.clear();
  alone_in_flight_ = false;
  for (auto& [id, f] : flights) {
    queue_.release(f.batch);
    if (f.lane) f.lane->cancel(f.request);
  }
}

void Uploader::set_client(coap::Client* client) {
  pause();
  extra_lanes_.clear();  // clones of the old client, maybe of another server
  client_ = client;
  window_ = 1;  // a new path: start low again (RFC 8085 §3.1)
  if (client_) send_timer_.arm_in(Millis(0));
}

void Uploader::reconfigure(const config::DeliveryConfig& delivery, double drain_rate) {
  delivery_ = delivery;
  drain_rate_ = drain_rate;
  backoff_.configure(delivery.backoff_initial, delivery.backoff_max);
  window_ = std::min<double>(window_, delivery_.max_in_flight);
  threshold_ = std::min<double>(threshold_, delivery_.max_in_flight);
}

coap::Client* Uploader::free_lane() {
  const auto busy = [&](coap::Client* c) {
    return std::find(busy_lanes_.begin(), busy_lanes_.end(), c) != busy_lanes_.end();
  };
  if (!busy(client_)) return client_;
  for (auto& lane : extra_lanes_)
    if (!busy(lane.get())) return lane.get();
  std::string err;
  auto lane = client_->clone(&err);
  if (!lane) {
    spdlog::warn("cannot open another CoAP session ({}); sending fewer requests at once", err);
    return nullptr;
  }
  extra_lanes_.push_back(std::move(lane));
  return extra_lanes_.back().get();
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

unsigned Uploader::window_limit() const {
  // queue.drain_rate paces one request at a time; finding a refused record too.
  if (drain_rate_ > 0 || single_record_mode_) return 1;
  const auto w = static_cast<unsigned>(std::floor(window_));
  return std::clamp(w, 1u, std::max(1u, delivery_.max_in_flight));
}

void Uploader::send_next() {
  if (!client_) return;
  while (!alone_in_flight_ && in_flight_.size() < window_limit()) {
    if (!send_one()) break;
  }
}

bool Uploader::send_one() {
  // In single-record mode next_batch(1) still hands out exactly one record.
  telemetry::Batch batch = queue_.next_batch(single_record_mode_ ? 1 : delivery_.max_batch_size);
  if (batch.empty()) {
    if (in_flight_.empty()) {
      if (state_ == DeliveryState::Retrying) set_state(DeliveryState::Idle, "");
      // Drained: the extra sessions (a socket each) go until the next backlog. We may be inside
      // one of their callbacks; a Client allows that.
      extra_lanes_.clear();
    }
    return false;
  }
  InFlight f;
  f.alone = batch.payload.size() > kOneDatagramPayload;
  if (f.alone && !in_flight_.empty()) {
    queue_.release(batch);  // sent once the others are done
    return false;
  }
  if (auto points = telemetry::point_hashes(batch.payload)) {
    f.points = std::move(*points);
  } else if (!in_flight_.empty()) {
    queue_.release(batch);  // cannot tell which points it holds: send it alone
    return false;
  }
  for (const auto p : f.points) {
    if (busy_points_.count(p)) {
      // A reading of the same key with the same ts is in flight: ThingsBoard would keep
      // whichever lands last, so this batch waits for that one to finish.
      queue_.release(batch);
      return false;
    }
  }
  f.lane = free_lane();
  if (!f.lane) {
    queue_.release(batch);
    return false;
  }
  busy_lanes_.push_back(f.lane);
  for (const auto p : f.points) ++busy_points_[p];
  f.probe = single_record_mode_;
  f.epoch = congestion_epoch_;
  f.auth_epoch = auth_epoch_;
  f.batch = std::move(batch);
  alone_in_flight_ = f.alone;
  // A generation number tells a late callback of a paused request from the current one.
  const std::uint64_t generation = generation_;
  const std::uint64_t key = ++next_key_;
  std::string payload = f.batch.payload;
  auto& entry = in_flight_.emplace(key, std::move(f)).first->second;
  // request() never calls back from inside it, so the entry is complete before any outcome.
  entry.request =
      entry.lane->request(coap::Method::Post, credentials::api_path(token_, "telemetry"),
                          std::move(payload), [this, generation, key](const coap::Outcome& o) {
                            if (generation == generation_) on_outcome(key, o);
                          });
  return true;
}

void Uploader::forget(const InFlight& f) {
  for (const auto p : f.points) {
    auto it = busy_points_.find(p);
    if (it != busy_points_.end() && --it->second == 0) busy_points_.erase(it);
  }
  if (f.alone) alone_in_flight_ = false;
  if (auto it = std::find(busy_lanes_.begin(), busy_lanes_.end(), f.lane); it != busy_lanes_.end())
    busy_lanes_.erase(it);
}

bool Uploader::congestion(std::uint64_t epoch, bool to_one) {
  if (epoch != congestion_epoch_) return false;  // sent before the last reduction
  ++congestion_epoch_;
  threshold_ = std::max(1.0, std::floor(window_ / 2));
  last_reduction_ = {window_, to_one ? 1.0 : threshold_, last_reduction_.count + 1};
  spdlog::debug("delivery: at most {} requests in flight (was {})", last_reduction_.to,
                std::floor(window_));
  window_ = last_reduction_.to;
  return true;
}

void Uploader::on_outcome(std::uint64_t key, const coap::Outcome& outcome) {
  auto node = in_flight_.extract(key);
  if (node.empty()) return;  // paused meanwhile: the batch was already released
  InFlight f = std::move(node.mapped());
  forget(f);
  std::string err;

  // docs/thingsboard-coap.md §1: telemetry is stored when the server answers 2.01 Created, and
  // only then.
  if (outcome.answered() && outcome.response->code == 201) {
    on_delivered(std::move(f), outcome);
    return;
  }

  if (outcome.answered() && outcome.response->code / 100 == 2) {
    // Any other 2.xx is not ThingsBoard's answer to telemetry: keep the readings and retry.
    queue_.release(f.batch);
    fail(f.epoch, false,
         "protocol error: server answered " + coap::code_string(outcome.response->code) +
             " to telemetry, expected 2.01 Created; readings kept");
    return;
  }

  if (outcome.answered() && outcome.response->code == 400) {
    if (f.batch.ids.size() > 1) {
      // Which record does the server refuse? Send them one at a time to find out.
      spdlog::warn("server refused a batch of {} records (4.00); sending them one by one",
                   f.batch.ids.size());
      queue_.release(f.batch);
      single_record_mode_ = true;
      suspects_left_ += f.batch.ids.size();
      if (!send_timer_.armed()) send_timer_.arm_in(Millis(0));
      return;
    }
    if (consecutive_drops_ >= kMaxConsecutiveDrops) {
      queue_.release(f.batch);
      retry(
          "server refuses every payload (4.00); keeping the data — check the device profile "
          "(it must use the DEFAULT or COAP transport with JSON payloads)");
      return;
    }
    ++consecutive_drops_;
    if (!queue_.drop(f.batch, &err)) spdlog::error("cannot drop a refused record: {}", err);
    spdlog::error(
        "server refused a record (4.00): dropped {} reading(s): {}", f.batch.readings,
        f.batch.payload.size() > 200 ? f.batch.payload.substr(0, 200) + "…" : f.batch.payload);
    if (callbacks_.dropped) callbacks_.dropped(f.batch.readings);
    if (f.probe) settle_suspect();
    if (!send_timer_.armed()) send_timer_.arm_in(Millis(0));
    return;
  }

  if (outcome.answered() && outcome.response->code == 413 && f.batch.ids.size() > 1) {
    // 4.13: "reduce the body" (docs/thingsboard-coap.md, recommendations). Resending the same
    // batch would be refused forever; one record at a time is the smallest body we can send.
    spdlog::warn(
        "server refused a batch of {} records as too large (4.13); sending them one by one",
        f.batch.ids.size());
    queue_.release(f.batch);
    single_record_mode_ = true;
    suspects_left_ += f.batch.ids.size();
    if (!send_timer_.armed()) send_timer_.arm_in(Millis(0));
    return;
  }
  queue_.release(f.batch);
  if (outcome.answered() && outcome.response->code == 401) {
    const bool x509 = token_.empty();
    if (x509 && f.auth_epoch != auth_epoch_ && state_ != DeliveryState::Unauthorized) {
      // Sent before the sessions were renewed: the retry below settles it.
      if (!send_timer_.armed()) send_timer_.arm_in(Millis(0));
      return;
    }
    if (x509 && !auth_retried_) {
      // ThingsBoard binds the X.509 identity to the handshake, under (client address,
      // certificate) (docs/thingsboard-coap.md §6.2): a new address (NAT rebinding) or an
      // evicted cache entry answers 4.01 until a new full handshake. So: one fresh handshake on
      // every session, one retry; a second 4.01 is final.
      spdlog::warn(
          "server answered 4.01 to our X.509 certificate: retrying once on a fresh DTLS "
          "handshake");
      auth_retried_ = true;
      ++auth_epoch_;
      congestion(congestion_epoch_, true);
      client_->renew_session();
      for (auto& lane : extra_lanes_) lane->renew_session();
      if (!send_timer_.armed()) send_timer_.arm_in(Millis(0));
      return;
    }
    if (state_ == DeliveryState::Unauthorized) return;  // said already
    const std::string msg =
        x509 ? "server rejected the device's X.509 certificate (4.01, also after a fresh DTLS "
               "handshake): sending stopped, readings are kept; register the certificate of "
               "server.dtls.cert_file in ThingsBoard, then reload or call Flush()"
             : "server rejected the access token (4.01): sending stopped, readings are kept; fix "
               "the device's credentials, then reload or call Flush()";
    spdlog::error("{}", msg);
    congestion(congestion_epoch_, true);
    set_state(DeliveryState::Unauthorized, msg, delivery_.backoff_max);
    // Probe rarely: the token may be restored on the server side.
    send_timer_.arm_in(delivery_.backoff_max);
    return;
  }
  // Timeouts and network errors: the path may be gone, start again from one request (RFC 8085
  // §3.1.3, like a retransmission timeout); 5.00 and the rest: halve.
  const bool lost = !outcome.answered() && (outcome.failure == coap::Failure::Timeout ||
                                            outcome.failure == coap::Failure::Network);
  fail(f.epoch, lost, coap::describe(outcome));
}

void Uploader::fail(std::uint64_t epoch, bool to_one, const std::string& why) {
  // Requests sent before the last reduction fail for the same reason: their batches are kept,
  // and the backoff already running is not stretched by each of them. With nothing in flight
  // and nothing armed, though, only a retry keeps delivery going.
  if (congestion(epoch, to_one) || (in_flight_.empty() && !send_timer_.armed())) retry(why);
}

void Uploader::on_delivered(InFlight f, const coap::Outcome& outcome) {
  const std::uint64_t readings = f.batch.readings;
  unacked_.push_back({std::move(f.batch), f.epoch});
  // Ack now rather than later: while acks fail (delivery pauses anyway), when a probe must settle
  // before the next batch is chosen, when many are waiting, or if the defer source is missing.
  if (ack_failing_ || f.probe || unacked_.size() >= kMaxCoalescedAcks || !ack_source_) {
    if (!flush_acks()) return;
  } else {
    sd_event_source_set_enabled(ack_source_, SD_EVENT_ONESHOT);
  }
  auth_retried_ = false;  // a 2.01: the credentials work
  if (f.probe) settle_suspect();
  if (outcome.elapsed >= kSlowExchange) {
    congestion(f.epoch, false);
  } else if (f.epoch == congestion_epoch_ && in_flight_.size() + 1 >= window_limit()) {
    // Slow start below the threshold (+1 per answer: doubles per round trip), then +1 per
    // window of answers (RFC 8085 §3.1: grow on success) — only while the window is used, so a
    // trickle of readings does not earn a window it never tried (RFC 7661).
    window_ += window_ < threshold_ ? 1.0 : 1.0 / window_;
    window_ = std::min<double>(window_, delivery_.max_in_flight);
  }
  // A success of a request sent before the last failure says nothing of the server now: the
  // backoff keeps running.
  if (send_timer_.armed() && state_ != DeliveryState::Idle) return;
  backoff_.reset();
  set_state(DeliveryState::Idle, "");
  // Draining a backlog: go on at once (we run from the client's dispatcher, not inside libcoap,
  // so a new request is fine here); a timer only when drain_rate asks for a pause. The records
  // of unacked batches are still in flight for the queue: next_batch does not hand them out.
  if (const Millis pause = rate_delay(readings); pause.count() > 0)
    send_timer_.arm_in(pause);
  else if (!send_timer_.armed())
    send_next();
}

bool Uploader::flush_acks(bool notify) {
  if (ack_source_) sd_event_source_set_enabled(ack_source_, SD_EVENT_OFF);
  if (unacked_.empty()) return true;
  std::vector<Delivered> done;
  done.swap(unacked_);
  std::vector<const telemetry::Batch*> batches;
  batches.reserve(done.size());
  std::uint64_t readings = 0;
  for (const auto& d : done) {
    batches.push_back(&d.batch);
    readings += d.batch.readings;
  }
  std::string err;
  if (!queue_.ack_all(batches, &err)) {
    if (!notify) return false;  // tearing down: released, nothing to tell anyone
    // A local fault (the state disk is full, read-only, ...): the server has the batches but the
    // queue still holds them (ack_all released them). Sending on at once would resend them in a
    // storm; counting them would count them again when they are resent. So: keep them queued,
    // count nothing, back off like any failure and resend later (at-least-once: same ts,
    // ThingsBoard overwrites the point).
    if (!ack_failing_)
      spdlog::error(
          "delivered {} reading(s), but cannot remove them from the queue ({}); they stay "
          "queued and will be sent again with the same timestamps once the queue can be "
          "written; delivery pauses until then",
          readings, err);
    ack_failing_ = true;
    bool reduced = false;
    for (const auto& d : done) reduced = congestion(d.epoch, true) || reduced;
    if (reduced || !send_timer_.armed()) {
      const Millis delay = backoff_.next();
      set_state(DeliveryState::Retrying, "cannot remove delivered readings from the queue: " + err,
                delay,
                /*log=*/false);
      send_timer_.arm_in(delay);
    }
    return false;
  }
  if (ack_failing_) {
    spdlog::info("removing delivered readings from the queue works again");
    ack_failing_ = false;
  }
  consecutive_drops_ = 0;
  if (notify && callbacks_.delivered)
    for (const auto& d : done) callbacks_.delivered(d.batch.readings);
  return true;
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
