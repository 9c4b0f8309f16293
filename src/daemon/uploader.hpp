// Moves telemetry from the durable queue to ThingsBoard: several batches in flight at once, as
// many as a congestion window allows (docs/performance.md, "Several requests in flight").
//
// Every delivery ends in one of four results (Fluent Bit's ok/retry/drop, plus unauthorized):
//   ok           2.xx              ack the batch, go on at once
//   retry        timeout, network, 5.xx, and 4.xx that say nothing about the payload
//                                  keep the batch, wait a capped full-jitter backoff
//   drop         4.00 for one record (docs/thingsboard-coap.md, "Classifying responses")
//                                  a multi-record batch is split first, so only the record the
//                                  server refuses is dropped; if single records keep being refused
//                                  the server rejects everything and we keep the data and retry
//   unauthorized 4.01              stop sending, keep every reading, say so; probe again rarely.
//                                  With X.509 (no token) first one fresh full DTLS handshake
//                                  and one retry (docs/thingsboard-coap.md, recommendations)
//
// The window (RFC 7252 §4.7 NSTART, RFC 8085 §3.1): it starts at 1, grows by one per success up
// to the halved value of the last reduction (slow start), then by one per window of successes,
// up to delivery.max_in_flight. A 5.00 or another retryable failure halves it, a timeout or a
// network error sets it to 1, and an answer that took longer than the RFC's ACK_TIMEOUT (a
// retransmission, or a server that answers late) halves it too — once per window of requests,
// not once per request that was already in flight. Two batches in flight never share a
// (ts, key) point (telemetry::point_hashes), so whatever order they land in, ThingsBoard stores
// the same thing; a Block1 batch goes alone (the server tracks Block1 per peer and URI).
// Each request in flight has a lane of its own: the client it was given, or a clone of it (one
// CoAP exchange per session, NSTART 1 each; see coap::Client::clone for why), made as the window
// grows and dropped once the queue is drained.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "coap/client.hpp"
#include "config/config.hpp"
#include "telemetry/queue.hpp"
#include "util/backoff.hpp"
#include "util/timer.hpp"

namespace tb::daemon {

enum class DeliveryState {
  Idle,          // nothing to send, or sending succeeds
  Retrying,      // the last delivery failed; waiting for the backoff
  Unauthorized,  // the server rejects the access token
};

struct DeliveryEvent {
  DeliveryState state = DeliveryState::Idle;
  std::string error;  // why the last delivery failed; empty on success
  Millis retry_in{0};
};

class Uploader {
 public:
  struct Callbacks {
    std::function<void(const DeliveryEvent&)> state_changed;
    std::function<void(std::uint64_t readings)> delivered;  // acknowledged by the server
    std::function<void(std::uint64_t readings)> dropped;    // refused by the server for good
  };

  Uploader(sd_event* loop, telemetry::Queue& queue, config::DeliveryConfig delivery,
           double drain_rate, Callbacks callbacks);
  ~Uploader();

  // Starts delivering with this client and token (empty: the X.509 identity of the DTLS
  // handshake, token-less paths). The client must outlive the uploader or be replaced with
  // set_client() first.
  void start(coap::Client* client, std::string token);
  // New readings were queued: deliver within flush_interval.
  void kick();
  // Deliver now, skipping any backoff or unauthorized wait (D-Bus Flush()).
  void flush_now();
  // Forget the in-flight request (its batch is released) — before replacing the client.
  void pause();
  void set_client(coap::Client* client);
  void reconfigure(const config::DeliveryConfig& delivery, double drain_rate);

  bool started() const { return client_ != nullptr; }
  bool busy() const { return !in_flight_.empty(); }
  DeliveryState state() const { return state_; }
  // Requests in flight now, and the window they may fill (for tests and the bench).
  std::size_t in_flight() const { return in_flight_.size(); }
  double window() const { return window_; }
  // The last reduction of the window: from what to what, and how many there have been. Successes
  // are reported once per loop wake-up (acks are coalesced), so a caller cannot know the window
  // just before a failure any other way.
  struct Reduction {
    double from = 0;
    double to = 0;
    std::uint64_t count = 0;
  };
  const Reduction& last_reduction() const { return last_reduction_; }
  // Batches the server took whose ack waits for the end of this loop wake-up (coalesced acks).
  std::size_t unacked() const { return unacked_.size(); }

 private:
  struct InFlight {
    telemetry::Batch batch;
    std::vector<std::uint64_t> points;  // telemetry::point_hashes of the payload
    std::uint64_t epoch = 0;            // congestion_epoch_ when it was sent
    bool probe = false;                 // one record of a batch refused with 4.00
    bool alone = false;                 // Block1: nothing else in flight meanwhile
    coap::Client* lane = nullptr;
    coap::RequestId request = 0;
    std::uint64_t auth_epoch = 0;  // auth_epoch_ when it was sent
  };

  void send_next();
  // Takes the next batch; false when nothing can be sent now (empty, conflicting, alone).
  bool send_one();
  void on_outcome(std::uint64_t key, const coap::Outcome& outcome);
  void on_delivered(InFlight f, const coap::Outcome& outcome);
  // Acks every delivered batch not yet removed from the queue in one transaction; false (and
  // backing off) if the queue cannot be written. `notify` false (the destructor): no callbacks,
  // no state change.
  bool flush_acks(bool notify = true);
  static int on_ack_flush(sd_event_source* s, void* userdata) noexcept;
  void retry(const std::string& why);
  // A retryable failure of a request sent in `epoch`: shrink the window and back off, once.
  void fail(std::uint64_t epoch, bool to_one, const std::string& why);
  // A congestion signal for a request sent in `epoch`: shrink the window once per epoch.
  bool congestion(std::uint64_t epoch, bool to_one);
  void forget(const InFlight& f);
  // A client with nothing of ours in flight, cloned if need be; null if none can be had.
  coap::Client* free_lane();
  unsigned window_limit() const;
  void settle_suspect();
  // `log`: false where the caller logs once per episode itself (an ack failure).
  void set_state(DeliveryState s, const std::string& error, Millis retry_in = Millis(0),
                 bool log = true);
  Millis rate_delay(std::uint64_t readings) const;

  telemetry::Queue& queue_;
  config::DeliveryConfig delivery_;
  double drain_rate_;
  Callbacks callbacks_;
  coap::Client* client_ = nullptr;
  std::string token_;
  Backoff backoff_;
  Timer send_timer_;
  std::map<std::uint64_t, InFlight> in_flight_;  // by our own key, in sending order
  std::uint64_t next_key_ = 0;
  std::unordered_map<std::uint64_t, unsigned> busy_points_;  // points of in_flight_, counted
  bool alone_in_flight_ = false;
  std::vector<std::unique_ptr<coap::Client>> extra_lanes_;  // clones of client_
  std::vector<coap::Client*> busy_lanes_;
  // Congestion window (see the top of this file). An epoch ends at every reduction: requests
  // sent before it cannot shrink the window again, nor restart a backoff already running.
  double window_ = 1;
  double threshold_ = 0;  // slow start below it
  std::uint64_t congestion_epoch_ = 0;
  Reduction last_reduction_;
  DeliveryState state_ = DeliveryState::Idle;
  std::string last_error_;
  // 4.00 handling: after a multi-record batch is refused we send one record at a time until a
  // success; refused single records are dropped, but only up to kMaxConsecutiveDrops in a row.
  bool single_record_mode_ = false;
  std::size_t suspects_left_ = 0;  // records of the refused batch not yet settled
  unsigned consecutive_drops_ = 0;
  // The server took a batch but the queue could not remove it (disk full): a local fault episode,
  // logged once, retried with backoff, ended by the next successful ack.
  bool ack_failing_ = false;
  std::uint64_t generation_ = 0;
  // X.509: a 4.01 renewed every session (a fresh handshake) and its batch is being retried; a
  // second 4.01 means the certificate is not registered. Requests sent before the renewal
  // (an older auth_epoch_) do not count.
  bool auth_retried_ = false;
  std::uint64_t auth_epoch_ = 0;
  // Coalesced acks (docs/performance.md): batches the server took (2.01) and the queue has not
  // removed yet. An idle-priority defer source acks them all in one transaction once the loop
  // has dispatched every answer of this wake-up. Lost on kill -9 = sent again (at-least-once).
  struct Delivered {
    telemetry::Batch batch;
    std::uint64_t epoch = 0;
  };
  std::vector<Delivered> unacked_;
  sd_event_source* ack_source_ = nullptr;
};

const char* delivery_state_name(DeliveryState s);

}  // namespace tb::daemon
