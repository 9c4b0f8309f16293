// Moves telemetry from the durable queue to ThingsBoard, one batch at a time.
//
// Every delivery ends in one of four results (Fluent Bit's ok/retry/drop, plus unauthorized):
//   ok           2.xx              ack the batch, go on at once
//   retry        timeout, network, 5.xx, and 4.xx that say nothing about the payload
//                                  keep the batch, wait a capped full-jitter backoff
//   drop         4.00 for one record (docs/thingsboard-coap.md, "Classifying responses")
//                                  a multi-record batch is split first, so only the record the
//                                  server refuses is dropped; if single records keep being refused
//                                  the server rejects everything and we keep the data and retry
//   unauthorized 4.01              stop sending, keep every reading, say so; probe again rarely
#pragma once

#include <cstdint>
#include <functional>
#include <string>

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

  // Starts delivering with this client and token. The client must outlive the uploader or be
  // replaced with set_client() first.
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
  bool busy() const { return in_flight_ != 0; }
  DeliveryState state() const { return state_; }

 private:
  void send_next();
  void on_outcome(const coap::Outcome& outcome);
  void retry(const std::string& why);
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
  telemetry::Batch batch_;
  coap::RequestId in_flight_ = 0;
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
};

const char* delivery_state_name(DeliveryState s);

}  // namespace tb::daemon
