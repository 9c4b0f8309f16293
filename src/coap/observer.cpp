// CoAP Observe client: libcoap 4.3.1 bridged into sd-event, like client.cpp but with a context
// (socket) of its own, so Client's exactly-once request contract is untouched. See observer.hpp
// and docs/coap.md "Observe".
#include "coap/observer.hpp"

#include <sys/epoll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <map>
#include <unordered_map>
#include <utility>
#include <variant>

#include <spdlog/spdlog.h>
#include "coap/libcoap.hpp"

#include "coap/libcoap_glue.hpp"
#include "net/resolver.hpp"
#include "util/units.hpp"

namespace tb::coap {

namespace {

// RFC 7252 §5.3.1: up to 8 bytes; ThingsBoard (Californium) allows at most 8 (§6.6).
constexpr std::size_t kTokenLength = 8;
// RFC 7641 §3.4: a notification whose sequence number is not newer is still fresh after 128 s.
constexpr std::uint64_t kFreshnessUsec = 128'000'000;
constexpr std::uint32_t kHalfSequenceSpace = 1u << 23;

std::string token_key(const coap_bin_const_t& t) {
  return std::string(reinterpret_cast<const char*>(t.s), t.length);
}

coap_fixed_point_t to_fixed(Millis ms) {
  const auto v = static_cast<unsigned>(std::max<Millis::rep>(ms.count(), 1));
  return coap_fixed_point_t{static_cast<uint16_t>(std::min(v / 1000, 65535u)),
                            static_cast<uint16_t>(v % 1000)};
}

int code_number(coap_pdu_code_t code) { return (code >> 5) * 100 + (code & 0x1f); }

// RFC 7641 §3.4: V2 is newer than V1 when (V1 < V2 and V2 - V1 < 2^23) or (V1 > V2 and
// V1 - V2 > 2^23), or when more than 128 s passed since V1 arrived.
bool is_fresh(std::uint32_t v1, std::uint64_t t1, std::uint32_t v2, std::uint64_t t2) {
  if ((v1 < v2 && v2 - v1 < kHalfSequenceSpace) || (v1 > v2 && v1 - v2 > kHalfSequenceSpace))
    return true;
  return t2 > t1 + kFreshnessUsec;
}

}  // namespace

const char* to_string(EndReason reason) {
  switch (reason) {
    case EndReason::Deleted:
      return "ended by the server (2.02)";
    case EndReason::Rejected:
      return "refused by the server";
    case EndReason::NotObserved:
      return "not kept by the server";
    case EndReason::Timeout:
      return "no answer";
    case EndReason::Network:
      return "network error";
    case EndReason::Protocol:
      return "protocol error";
  }
  return "ended";
}

struct Observer::Impl {
  // Shared with queued deliveries: cancel() marks it, so nothing queued runs afterwards.
  struct Callbacks {
    NotificationCallback on_notification;
    EndCallback on_end;
    bool canceled = false;
  };
  struct Observation {
    ObservationId id = 0;
    std::vector<std::string> path;
    std::string log_path;
    std::string token;  // raw bytes; empty until sent
    std::shared_ptr<Callbacks> callbacks;
    sd_event_source* timeout = nullptr;  // until the registration is answered
    bool confirmed = false;
    std::optional<std::uint32_t> last_sequence;
    std::uint64_t last_time = 0;  // CLOCK_MONOTONIC µs of the last fresh notification
  };
  struct Ready {
    std::shared_ptr<Callbacks> callbacks;
    std::variant<Notification, ObservationEnd> what;
  };

  sd_event* loop = nullptr;
  Endpoint endpoint;
  ObserverOptions options;
  coap_address_t remote{};
  std::string remote_text;
  coap_context_t* ctx = nullptr;
  coap_session_t* session = nullptr;
  bool session_broken = false;
  bool fresh_address = false;
  sd_event_source* io = nullptr;
  sd_event_source* coap_timer = nullptr;
  sd_event_source* dispatcher = nullptr;
  std::unique_ptr<net::Resolver> resolver;
  std::unordered_map<ObservationId, Observation> observations;
  std::unordered_map<std::string, ObservationId> by_token;
  std::deque<ObservationId> awaiting_address;
  std::deque<Ready> ready;
  ObservationId next_id = 1;
  std::map<ListenerId, std::function<void()>> answer_listeners;
  ListenerId next_listener = 1;
  bool answered = false;  // a registration was answered with success: listeners are due
  bool destroying = false;
  std::vector<std::string> secrets_used;
  std::shared_ptr<bool> alive = std::make_shared<bool>(true);

  ~Impl() {
    destroying = true;
    *alive = false;
    resolver.reset();
    for (auto& [id, o] : observations) sd_event_source_disable_unref(o.timeout);
    observations.clear();
    ready.clear();
    if (session) coap_session_release(session);
    if (ctx) coap_free_context(ctx);
    sd_event_source_disable_unref(io);
    sd_event_source_disable_unref(coap_timer);
    sd_event_source_disable_unref(dispatcher);
    sd_event_unref(loop);
    for (const auto& s : secrets_used) detail::remove_secret(s);
  }

  std::uint64_t now_usec() const {
    std::uint64_t now = 0;
    sd_event_now(loop, CLOCK_MONOTONIC, &now);
    return now;
  }

  // -- sd-event glue (as client.cpp) --

  static int on_io(sd_event_source*, int, uint32_t, void* userdata) noexcept {
    try {
      auto* self = static_cast<Impl*>(userdata);
      coap_io_process(self->ctx, COAP_IO_NO_WAIT);
      self->rearm();
    } catch (const std::exception& e) {
      spdlog::error("coap observe: io handler: {}", e.what());
    } catch (...) {
      spdlog::error("coap observe: io handler failed");
    }
    return 0;
  }

  static int on_coap_timer(sd_event_source*, uint64_t, void* userdata) noexcept {
    return on_io(nullptr, -1, 0, userdata);
  }

  void rearm() {
    coap_tick_t now;
    coap_ticks(&now);
    const unsigned ms = coap_io_prepare_epoll(ctx, now);
    if (ms == 0) {
      sd_event_source_set_enabled(coap_timer, SD_EVENT_OFF);
      return;
    }
    sd_event_source_set_time(coap_timer, now_usec() + uint64_t{ms} * 1000);
    sd_event_source_set_enabled(coap_timer, SD_EVENT_ONESHOT);
  }

  static int on_register_timeout(sd_event_source* src, uint64_t, void* userdata) noexcept {
    try {
      auto* self = static_cast<Impl*>(userdata);
      for (auto& [id, o] : self->observations) {
        if (o.timeout != src) continue;
        // libcoap keeps retransmitting the unanswered CON and, with NSTART 1 (RFC 7252 §4.7),
        // holds every later registration behind it. Only dropping the session (its socket)
        // stops it, and that ends every observation made on it: they end too, so their owners
        // register again on a fresh socket.
        self->end_all(EndReason::Timeout, "no answer to the registration within " +
                                              format_duration(self->options.register_timeout));
        break;
      }
    } catch (...) {
      spdlog::error("coap observe: timeout handler failed");
    }
    return 0;
  }

  static int on_dispatch(sd_event_source*, void* userdata) noexcept {
    auto* self = static_cast<Impl*>(userdata);
    const std::shared_ptr<bool> alive = self->alive;
    try {
      std::deque<Ready> batch;
      batch.swap(self->ready);
      while (!batch.empty()) {
        Ready r = std::move(batch.front());
        batch.pop_front();
        invoke(r);
        if (!*alive) return 0;
      }
      if (self->answered) {
        self->answered = false;
        self->tell_answer_listeners();
        if (!*alive) return 0;
      }
      if (!self->ready.empty()) sd_event_source_set_enabled(self->dispatcher, SD_EVENT_ONESHOT);
    } catch (...) {
      spdlog::error("coap observe: dispatcher failed");
    }
    return 0;
  }

  static void invoke(Ready& r) {
    if (r.callbacks->canceled) return;
    try {
      if (auto* n = std::get_if<Notification>(&r.what)) {
        if (r.callbacks->on_notification) r.callbacks->on_notification(*n);
      } else if (r.callbacks->on_end) {
        r.callbacks->on_end(std::get<ObservationEnd>(r.what));
      }
    } catch (const std::exception& e) {
      spdlog::error("coap observe: callback threw: {}", e.what());
    } catch (...) {
      spdlog::error("coap observe: callback threw");
    }
  }

  // A listener may add or remove listeners, or destroy the Observer: ids are taken first.
  void tell_answer_listeners() {
    const std::shared_ptr<bool> still = alive;
    std::vector<ListenerId> ids;
    for (const auto& [id, fn] : answer_listeners) ids.push_back(id);
    for (ListenerId id : ids) {
      auto it = answer_listeners.find(id);
      if (it == answer_listeners.end()) continue;
      std::function<void()> fn = it->second;
      try {
        fn();
      } catch (const std::exception& e) {
        spdlog::error("coap observe: answer listener threw: {}", e.what());
      } catch (...) {
        spdlog::error("coap observe: answer listener threw");
      }
      if (!*still) return;
    }
  }

  void queue(const std::shared_ptr<Callbacks>& cb, std::variant<Notification, ObservationEnd> w) {
    if (destroying) return;
    ready.push_back(Ready{cb, std::move(w)});
    sd_event_source_set_enabled(dispatcher, SD_EVENT_ONESHOT);
  }

  // Forgets the observation and queues its end. Never calls user code.
  void end(ObservationId id, ObservationEnd e) {
    auto it = observations.find(id);
    if (it == observations.end()) return;
    Observation o = std::move(it->second);
    observations.erase(it);
    if (!o.token.empty()) by_token.erase(o.token);
    sd_event_source_disable_unref(o.timeout);
    spdlog::debug("coap observe: {} ended: {}{}", o.log_path, to_string(e.reason),
                  e.error.empty() ? "" : " (" + e.error + ")");
    queue(o.callbacks, std::move(e));
  }

  // Ends every observation and drops the socket; the next registration starts afresh (a new
  // session and a fresh address lookup). Never from inside a libcoap callback.
  void end_all(EndReason reason, const std::string& why) {
    std::vector<ObservationId> ids;
    for (const auto& [id, o] : observations) ids.push_back(id);
    std::sort(ids.begin(), ids.end());
    for (ObservationId id : ids) end(id, {reason, 0, why});
    resolver->cancel();
    awaiting_address.clear();
    drop_session();
    session_broken = false;
    fresh_address = false;
  }

  // -- libcoap handlers --

  static Impl* from(coap_session_t* s) {
    return static_cast<Impl*>(coap_get_app_data(coap_session_get_context(s)));
  }

  static coap_response_t on_response(coap_session_t* s, const coap_pdu_t*,
                                     const coap_pdu_t* received, const coap_mid_t) noexcept {
    try {
      Impl* self = from(s);
      if (!self || self->destroying) return COAP_RESPONSE_OK;
      return self->on_response(received);
    } catch (...) {
      spdlog::error("coap observe: response handler failed");
    }
    return COAP_RESPONSE_OK;
  }

  coap_response_t on_response(const coap_pdu_t* received) {
    auto it = by_token.find(token_key(coap_pdu_get_token(received)));
    if (it == by_token.end()) {
      // A canceled or ended observation (or a stray): RST ends it on the server (RFC 7641 §3.6).
      spdlog::debug("coap observe: notification for an unknown token: reset");
      return COAP_RESPONSE_FAIL;
    }
    const ObservationId id = it->second;
    Observation& o = observations.at(id);
    const int code = code_number(coap_pdu_get_code(received));
    const bool first = !o.confirmed;
    if (first) {
      o.confirmed = true;
      sd_event_source_disable_unref(o.timeout);
      o.timeout = nullptr;
    }
    if (code == 202) {
      end(id, {EndReason::Deleted, code, "the server ended the observation (2.02 Deleted)"});
      return COAP_RESPONSE_OK;
    }
    if (code / 100 != 2) {
      // A 4.01 over DTLS may be a stale X.509 identity, which ThingsBoard binds to the handshake
      // (docs/thingsboard-coap.md §6.2): the next registration gets a fresh full handshake.
      if (code == 401 && options.dtls) session_broken = true;
      end(id, {EndReason::Rejected, code, "server answered " + code_string(code)});
      return COAP_RESPONSE_OK;
    }
    coap_opt_iterator_t opt_iter;
    std::size_t len = 0;
    const uint8_t* data = nullptr;
    if (!coap_get_data(received, &len, &data) || !data) len = 0;
    // Over the bound, or block-wise (a body over one datagram; no block mode here): the
    // notification is acknowledged and reported as incomplete, without its payload; the
    // observation goes on and the owner reads the state with a GET (Client does Block2).
    const bool block2 = coap_check_option(received, COAP_OPTION_BLOCK2, &opt_iter) != nullptr;
    const bool incomplete = block2 || len > options.max_notification_body;
    if (incomplete) {
      spdlog::warn("coap observe: {}: {} notification, over the {} limit: payload not taken",
                   o.log_path, block2 ? "block-wise" : std::to_string(len) + "-byte",
                   format_size(options.max_notification_body));
      len = 0;
    }
    Notification n;
    n.code = code;
    n.first = first;
    n.incomplete = incomplete;
    n.payload.assign(reinterpret_cast<const char*>(data), len);
    if (coap_opt_t* cf = coap_check_option(received, COAP_OPTION_CONTENT_FORMAT, &opt_iter)) {
      n.content_format =
          static_cast<int>(coap_decode_var_bytes(coap_opt_value(cf), coap_opt_length(cf)));
    }
    coap_opt_t* obs = coap_check_option(received, COAP_OPTION_OBSERVE, &opt_iter);
    if (obs) {
      n.sequence = coap_decode_var_bytes(coap_opt_value(obs), coap_opt_length(obs));
      const std::uint64_t now = now_usec();
      if (!first && o.last_sequence && !is_fresh(*o.last_sequence, o.last_time, *n.sequence, now)) {
        spdlog::debug("coap observe: {}: stale notification {} after {} dropped", o.log_path,
                      *n.sequence, *o.last_sequence);
        return COAP_RESPONSE_OK;  // still acknowledged
      }
      o.last_sequence = n.sequence;
      o.last_time = now;
    }
    spdlog::debug("coap observe: {} -> {}{} ({} bytes)", o.log_path, code_string(code),
                  first ? " (registered)" : "", len);
    if (first) answered = true;  // told after this notification, by the same dispatch
    queue(o.callbacks, std::move(n));
    if (!obs) {
      end(id, {EndReason::NotObserved, code,
               "the server answered without Observe: it does not keep the observation"});
    }
    return COAP_RESPONSE_OK;
  }

  static void on_nack(coap_session_t* s, const coap_pdu_t* sent, const coap_nack_reason_t reason,
                      const coap_mid_t) noexcept {
    try {
      Impl* self = from(s);
      if (!self || self->destroying || !sent) return;
      EndReason r = EndReason::Network;
      const char* why = "could not deliver the registration";
      std::string tls_why;
      switch (reason) {
        case COAP_NACK_TOO_MANY_RETRIES:
          r = EndReason::Timeout;
          why = "no ACK of the registration after all retransmissions";
          break;
        case COAP_NACK_RST:
          why = "the server reset the registration (RST)";
          break;
        case COAP_NACK_ICMP_ISSUE:
          why = "ICMP error (server unreachable)";
          self->session_broken = true;
          break;
        case COAP_NACK_TLS_FAILED:
          tls_why = detail::tls_failure(self->remote_text);
          why = tls_why.c_str();
          self->session_broken = true;
          break;
        default:
          self->session_broken = true;
          break;
      }
      auto it = self->by_token.find(token_key(coap_pdu_get_token(sent)));
      if (it == self->by_token.end()) return;
      // A registration the server already answered (libcoap may still hold the CON request
      // when the answer came as a separate CON, §8) is not ended by its retransmissions.
      if (self->observations.at(it->second).confirmed && r == EndReason::Timeout) return;
      self->end(it->second, {r, 0, why});
    } catch (...) {
      spdlog::error("coap observe: nack handler failed");
    }
  }

  // -- session and address --

  bool session_usable() const {
    return session && !session_broken && coap_session_get_state(session) != COAP_SESSION_STATE_NONE;
  }

  void drop_session() {
    if (!session) return;
    coap_session_t* old = session;
    session = nullptr;
    coap_session_disconnected(old, COAP_NACK_NOT_DELIVERABLE);
    coap_session_release(old);
    rearm();
  }

  bool ensure_session(std::string* error) {
    if (session_usable()) return true;
    drop_session();
    session_broken = false;
    fresh_address = false;
    if (options.dtls) {
      detail::reset_tls_problem();
      coap_dtls_pki_t pki = detail::dtls_pki(*options.dtls);
      session = coap_new_client_session_pki(ctx, nullptr, &remote, COAP_PROTO_DTLS, &pki);
    } else {
      session = coap_new_client_session(ctx, nullptr, &remote, COAP_PROTO_UDP);
    }
    if (!session) {
      *error = "cannot create a CoAP session to " + remote_text;
      return false;
    }
    coap_session_set_ack_timeout(session, to_fixed(options.ack_timeout));
    coap_session_set_max_retransmit(session, static_cast<uint16_t>(options.max_retransmit));
    return true;
  }

  void resolve() {
    if (resolver->busy()) return;
    const Millis limit = std::max<Millis>(options.register_timeout * 9 / 10, Millis(100));
    resolver->resolve(endpoint.host, endpoint.port, limit,
                      [this](net::Resolution r) { on_resolved(std::move(r)); });
  }

  void on_resolved(net::Resolution r) {
    std::deque<ObservationId> waiting;
    waiting.swap(awaiting_address);
    if (!r.ok()) {
      const std::string why = "cannot resolve " + endpoint.host + ": " + r.error;
      for (ObservationId id : waiting) end(id, {EndReason::Network, 0, why});
      return;
    }
    const net::Address& a = r.addresses.front();
    coap_address_init(&remote);
    remote.size = a.length;
    std::memcpy(&remote.addr, &a.storage, a.length);
    char buf[INET6_ADDRSTRLEN + 16] = {};
    coap_print_addr(&remote, reinterpret_cast<unsigned char*>(buf), sizeof(buf) - 1);
    remote_text = buf;
    fresh_address = true;
    for (ObservationId id : waiting) send(id);
  }

  void send(ObservationId id) {
    auto it = observations.find(id);
    if (it == observations.end()) return;  // canceled or timed out meanwhile
    Observation& o = it->second;
    std::string error;
    if (!ensure_session(&error)) return end(id, {EndReason::Network, 0, error});
    std::string token(kTokenLength, '\0');
    do {
      coap_prng(token.data(), token.size());
    } while (by_token.count(token));
    coap_pdu_t* pdu = coap_new_pdu(COAP_MESSAGE_CON, COAP_REQUEST_CODE_GET, session);
    if (!pdu) return end(id, {EndReason::Network, 0, "cannot allocate a PDU"});
    bool ok = coap_add_token(pdu, token.size(), reinterpret_cast<const uint8_t*>(token.data()));
    uint8_t buf[4];
    // RFC 7641 §2: Observe (6) comes before Uri-Path (11); libcoap wants options in order.
    ok = ok &&
         coap_add_option(pdu, COAP_OPTION_OBSERVE,
                         coap_encode_var_safe(buf, sizeof(buf), COAP_OBSERVE_ESTABLISH), buf) != 0;
    for (const auto& seg : o.path) {
      ok = ok && coap_add_option(pdu, COAP_OPTION_URI_PATH, seg.size(),
                                 reinterpret_cast<const uint8_t*>(seg.data())) != 0;
    }
    if (!ok) {
      coap_delete_pdu(pdu);
      return end(id, {EndReason::Network, 0, "cannot build the registration PDU"});
    }
    o.token = token;
    by_token.emplace(token, id);
    spdlog::debug("coap observe: GET Observe=0 {}", o.log_path);
    if (coap_send(session, pdu) == COAP_INVALID_MID) {
      session_broken = true;
      end(id, {EndReason::Network, 0, "cannot send to " + remote_text});
    }
    rearm();
  }
};

std::unique_ptr<Observer> Observer::create(sd_event* loop, const Endpoint& endpoint,
                                           const ObserverOptions& options, std::string* error) {
  auto fail = [&](std::string msg) -> std::unique_ptr<Observer> {
    if (error) *error = std::move(msg);
    return nullptr;
  };
  if (!loop) return fail("no event loop");
  if (options.ack_timeout < std::chrono::seconds(1) ||
      options.ack_timeout > std::chrono::hours(1)) {
    return fail("ack_timeout must be between 1 s and 1 h");  // libcoap 4.3.1 ignores others
  }
  if (options.max_retransmit < 1 || options.max_retransmit > 20) {
    return fail("max_retransmit must be between 1 and 20");
  }
  if (options.register_timeout <= Millis(0)) return fail("register_timeout must be positive");
  if (options.max_notification_body < 64 || options.max_notification_body > 64 * 1024) {
    return fail("max_notification_body must be between 64 B and 64 KiB");
  }
  std::string load_error;
  if (!detail::prepare_libcoap(options.dtls, &load_error)) return fail(load_error);

  auto impl = std::make_unique<Impl>();
  impl->loop = sd_event_ref(loop);
  impl->endpoint = endpoint;
  impl->options = options;
  impl->remote_text = endpoint.host + ":" + std::to_string(endpoint.port);
  impl->resolver = std::make_unique<net::Resolver>(loop);
  impl->ctx = coap_new_context(nullptr);
  if (!impl->ctx) return fail("cannot create a libcoap context");
  coap_set_app_data(impl->ctx, impl.get());
  if (impl->options.dtls && !detail::trust_cas(impl->ctx, *impl->options.dtls, &load_error)) {
    return fail(load_error);
  }
  // No block mode: libcoap would track the observation itself (and cancel it with a GET
  // Observe=1 of its own when the session goes, possibly after a newer registration replaced
  // it). A notification over one block ends the observation instead (observer.hpp).
  coap_context_set_block_mode(impl->ctx, 0);
  coap_register_response_handler(impl->ctx, &Impl::on_response);
  coap_register_nack_handler(impl->ctx, &Impl::on_nack);
  const int fd = coap_context_get_coap_fd(impl->ctx);
  if (fd < 0) return fail("libcoap was built without epoll support");
  int r = sd_event_add_io(loop, &impl->io, fd, EPOLLIN, &Impl::on_io, impl.get());
  if (r < 0) return fail(std::string("sd_event_add_io: ") + std::strerror(-r));
  r = sd_event_add_time(loop, &impl->coap_timer, CLOCK_MONOTONIC, 0, 1000, &Impl::on_coap_timer,
                        impl.get());
  if (r < 0) return fail(std::string("sd_event_add_time: ") + std::strerror(-r));
  sd_event_source_set_enabled(impl->coap_timer, SD_EVENT_OFF);
  r = sd_event_add_defer(loop, &impl->dispatcher, &Impl::on_dispatch, impl.get());
  if (r < 0) return fail(std::string("sd_event_add_defer: ") + std::strerror(-r));
  sd_event_source_set_enabled(impl->dispatcher, SD_EVENT_OFF);
  sd_event_source_set_description(impl->io, "coap-observe-io");
  sd_event_source_set_description(impl->coap_timer, "coap-observe-timer");
  sd_event_source_set_description(impl->dispatcher, "coap-observe-dispatch");
  return std::unique_ptr<Observer>(new Observer(std::move(impl)));
}

Observer::Observer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Observer::~Observer() = default;

ObservationId Observer::observe(const std::vector<std::string>& path,
                                NotificationCallback on_notification, EndCallback on_end) {
  Impl& im = *impl_;
  detail::sync_log_level();
  if (const auto s = detail::secret_segment(path);
      s && std::find(im.secrets_used.begin(), im.secrets_used.end(), path[*s]) ==
               im.secrets_used.end()) {
    detail::add_secret(path[*s]);
    im.secrets_used.push_back(path[*s]);
  }
  Impl::Observation o;
  o.id = im.next_id++;
  o.path = path;
  o.log_path = detail::path_for_log(path);
  o.callbacks = std::make_shared<Impl::Callbacks>();
  o.callbacks->on_notification = std::move(on_notification);
  o.callbacks->on_end = std::move(on_end);
  const ObservationId id = o.id;
  const auto timeout_us = static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::microseconds>(im.options.register_timeout).count());
  const int r = sd_event_add_time(im.loop, &o.timeout, CLOCK_MONOTONIC, im.now_usec() + timeout_us,
                                  10000, &Impl::on_register_timeout, &im);
  if (r < 0) o.timeout = nullptr;
  im.observations.emplace(id, std::move(o));
  if (r < 0) {
    im.end(id, {EndReason::Network, 0, std::string("sd_event_add_time: ") + std::strerror(-r)});
    return id;
  }
  if (!im.session_usable() && !im.fresh_address) {
    im.awaiting_address.push_back(id);
    im.resolve();
    return id;
  }
  im.send(id);
  return id;
}

void Observer::cancel(ObservationId id) {
  Impl& im = *impl_;
  auto it = im.observations.find(id);
  if (it == im.observations.end()) return;
  it->second.callbacks->canceled = true;
  if (!it->second.token.empty()) im.by_token.erase(it->second.token);
  sd_event_source_disable_unref(it->second.timeout);
  spdlog::debug("coap observe: {} canceled", it->second.log_path);
  im.observations.erase(it);
}

void Observer::reset_network() { impl_->end_all(EndReason::Network, "network reset"); }

std::size_t Observer::active() const { return impl_->observations.size(); }

Observer::ListenerId Observer::add_answer_listener(std::function<void()> listener) {
  const ListenerId id = impl_->next_listener++;
  impl_->answer_listeners.emplace(id, std::move(listener));
  return id;
}

void Observer::remove_answer_listener(ListenerId id) { impl_->answer_listeners.erase(id); }

}  // namespace tb::coap
