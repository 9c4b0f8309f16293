// CoAP Observe (RFC 7641) on the agent's sd-event loop: one registration, many notifications.
// Only coap/ includes libcoap.
//
// A different kind of exchange from Client::request(), whose callback runs exactly once, so it
// is its own interface with its own socket (libcoap context): a registration is a CON GET with
// Observe=0 and a fresh random token (docs/thingsboard-coap.md §2.3: "use a fresh token for
// every registration"); every answer with that token is a notification, acknowledged at once
// by libcoap when it is CON; the observation ends when the server says so (2.02 Deleted, an
// error code, an answer without Observe), when the registration is not answered in time, when
// the network fails, or when the caller cancels it. Notifications of a canceled or ended
// observation are answered with RST, which ends the relation on the server (RFC 7641 §3.6).
//
// What this does not do: keep an observation alive. A server restart is silent for an observer
// and NAT bindings expire (docs/thingsboard-coap.md §7), so the caller re-registers with a new
// observe() at its own interval and cancels the older one once the newer is confirmed.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <systemd/sd-event.h>

#include "coap/client.hpp"
#include "util/clock.hpp"

namespace tb::coap {

struct ObserverOptions {
  // The registration's first answer must come within this; else the observation ends as Timeout.
  Millis register_timeout = 30s;
  Millis ack_timeout = 2s;  // CON retransmission of the registration (RFC 7252 §4.8)
  unsigned max_retransmit = 4;
  // Largest notification body taken. A larger one, or one sent block-wise (Block2: more than one
  // datagram), is acknowledged and delivered as `incomplete`, without its payload: the
  // observation goes on and the owner reads the state with a GET (Client does Block2 with its
  // own cap). The default is one ThingsBoard block (MAX_MESSAGE_SIZE 1024, §1).
  std::size_t max_notification_body = 1024;
  // Set: the observations go over DTLS like the Client's requests (never plain beside coaps).
  std::optional<DtlsOptions> dtls;
};

struct Notification {
  int code = 0;  // 205 (2.05 Content) or 203 (2.03 Valid, ThingsBoard's first RPC answer §3.1)
  std::string payload;
  int content_format = -1;                // -1 = absent
  std::optional<std::uint32_t> sequence;  // the Observe option's value
  bool first = false;                     // the answer to the registration itself
  bool incomplete = false;  // over max_notification_body or block-wise: payload left out
};

enum class EndReason {
  Deleted,      // 2.02 Deleted: the server ended it (a newer registration, a token change)
  Rejected,     // an error answer (4.xx, 5.xx): `code` says which
  NotObserved,  // an answer without the Observe option: the server does not (or no longer) keep
                // the relation (RFC 7641 §3.2); its payload was delivered as a notification
  Timeout,      // no answer to the registration within register_timeout, or no ACK of it
  Network,      // the request could not be sent, ICMP unreachable, or reset_network()
  Protocol,     // reserved: the server broke the protocol
};

struct ObservationEnd {
  EndReason reason = EndReason::Network;
  int code = 0;       // the answer's code for Deleted and Rejected
  std::string error;  // human readable
};

using ObservationId = std::uint64_t;
using NotificationCallback = std::function<void(const Notification&)>;
using EndCallback = std::function<void(const ObservationEnd&)>;

class Observer {
 public:
  // Never blocks: the host is resolved on the loop before the first registration, and again for
  // the first one after a network failure or reset_network(). Fails (nullptr, *error) only for
  // invalid options or when the loop refuses a source.
  static std::unique_ptr<Observer> create(sd_event* loop, const Endpoint& endpoint,
                                          const ObserverOptions& options, std::string* error);
  ~Observer();  // no callbacks from the destructor
  Observer(const Observer&) = delete;
  Observer& operator=(const Observer&) = delete;

  // Registers (CON GET, Observe=0, a fresh token) on the path segments. Callbacks always run
  // from the loop, never from inside observe() or cancel(): on_notification once per fresh
  // notification (stale ones by RFC 7641 §3.4 are acknowledged and dropped), then on_end exactly
  // once — unless the observation is canceled or the Observer destroyed first. Callbacks may
  // call observe(), cancel() and destroy the Observer.
  ObservationId observe(const std::vector<std::string>& path, NotificationCallback on_notification,
                        EndCallback on_end);
  // Forgets the observation: no more callbacks for it; later notifications get RST. Unknown ids
  // are ignored.
  void cancel(ObservationId id);
  // The network changed (or the caller suspects it did): drops the socket, so a new one (and a
  // fresh address lookup) serves the next registration; every observation ends as Network.
  void reset_network();
  // Observations registered or live (not ended, not canceled).
  std::size_t active() const;

  // `listener` runs (from the loop, after that answer's callbacks) each time the server answers a
  // registration with success: proof that it is reachable again, so owners waiting out a backoff
  // after an outage register at once instead of up to a backoff later. Only a success counts, so
  // two owners whose registrations are refused cannot wake each other in a loop.
  using ListenerId = std::uint64_t;
  ListenerId add_answer_listener(std::function<void()> listener);
  void remove_answer_listener(ListenerId id);  // unknown ids are ignored

 private:
  struct Impl;
  explicit Observer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

const char* to_string(EndReason reason);

}  // namespace tb::coap
