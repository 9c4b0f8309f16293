// libcoap 4.3.1 bridged into sd-event. See docs/coap.md for the design and its limits.
#include "coap/client.hpp"

#include <netdb.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <deque>
#include <filesystem>
#include <map>
#include <mutex>
#include <set>
#include <string_view>
#include <unordered_map>
#include <utility>

#include <spdlog/spdlog.h>
#include "coap/libcoap.hpp"

#include "coap/libcoap_glue.hpp"
#include "net/resolver.hpp"
#include "util/units.hpp"

namespace tb::coap {

// Shared with observer.cpp (coap/libcoap_glue.hpp): one log handler, one secret masker.
namespace detail {

// ---- logging ---------------------------------------------------------------------------------
//
// libcoap's log handler is process-wide. At debug it dumps every PDU including the Uri-Path
// options, and one of them is the device access token (docs/thingsboard-coap.md §0), so every
// secret path segment a Client has used is registered here (for the Client's lifetime, since
// libcoap may still retransmit or send blocks after we gave up on a request) and masked.

std::mutex secrets_mutex;
std::map<std::string, int, std::less<>>& secrets() {
  static std::map<std::string, int, std::less<>> s;
  return s;
}

void add_secret(const std::string& s) {
  if (s.empty()) return;
  std::lock_guard lock(secrets_mutex);
  ++secrets()[s];
}

void remove_secret(const std::string& s) {
  if (s.empty()) return;
  std::lock_guard lock(secrets_mutex);
  auto it = secrets().find(s);
  if (it != secrets().end() && --it->second <= 0) secrets().erase(it);
}

std::string mask_secrets(std::string text) {
  std::lock_guard lock(secrets_mutex);
  for (const auto& [secret, count] : secrets()) {
    for (auto pos = text.find(secret); pos != std::string::npos;
         pos = text.find(secret, pos + 10)) {
      text.replace(pos, secret.size(), "<redacted>");
    }
  }
  return text;
}

// A send or receive failing on the socket ("coap_network_read: ICMP: Connection refused"): the
// request then fails and the agent reports it in its own words ("delivery failed (network
// error …)"), so libcoap's line would only repeat it — kept at debug.
bool is_socket_error(std::string_view text) {
  return text.find("ICMP") != std::string_view::npos ||
         text.find("coap_network_read") != std::string_view::npos ||
         text.find("coap_network_send") != std::string_view::npos ||
         text.find("coap_socket_") != std::string_view::npos;
}

// A failed DTLS handshake reaches the client as COAP_NACK_TLS_FAILED, with no reason; libcoap's
// OpenSSL layer logs the reason just before. The first precise one of a handshake is kept here
// (one thread) and becomes the request's error text: "certificate has expired: 'tb.example'
// depth=0", "SSL3 alert read:fatal:bad certificate" (the server refused ours), "Unknown CA".
std::string g_tls_problem;

// "<session>: <reason>" → "<reason>"; libcoap 4.3.1 coap_openssl.c tls_verify_call_back,
// coap_dtls_info_callback and setup_pki_ssl.
bool take_tls_problem(std::string_view text) {
  const bool verify = text.find(" depth=") != std::string_view::npos;
  const bool alert = text.find("SSL3 alert ") != std::string_view::npos &&
                     text.find(":fatal:") != std::string_view::npos;
  const bool setup = text.find("setup_pki") != std::string_view::npos;
  // The OpenSSL layer's summary after the precise line ("SSL_connect:error in error",
  // "certificate verify failed at SSL routines"): taken only when nothing precise came first.
  const bool summary = text.find("SSL_connect:") != std::string_view::npos ||
                       text.find(" at SSL routines") != std::string_view::npos ||
                       text.find(" at DTLS routines") != std::string_view::npos;
  if (!verify && !alert && !setup && !summary) return false;
  if (g_tls_problem.empty()) {
    std::string_view reason = text;
    if (verify || alert) {
      // The session text ends in "DTLS" (or "UDP"): the reason follows the first ": " after it.
      const auto after = text.find("DTLS: ");
      if (after != std::string_view::npos) reason = text.substr(after + 6);
    }
    while (!reason.empty() && (reason.front() == ' ' || reason.front() == '*'))
      reason.remove_prefix(1);
    g_tls_problem = std::string(reason.substr(0, 200));
  }
  return true;
}

void coap_log_handler(coap_log_t level, const char* message) {
  try {
    std::string text = mask_secrets(message ? message : "");
    while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
    // A handshake's reason is reported once, in the failed request's words.
    if (level <= LOG_WARNING && take_tls_problem(text)) {
      spdlog::debug("libcoap: {}", text);
      return;
    }
    // PDU dumps end in " :: 'payload'". Payloads carry secrets no token mask knows: the
    // provisioning secret we send and the credentials the server answers (§4.1, §4.2). Keep the
    // header, never the payload.
    if (const auto pos = text.find(" :: "); pos != std::string::npos)
      text = text.substr(0, pos) + " :: <payload not logged>";
    // libcoap uses syslog levels (coap_debug.h).
    if (level <= LOG_ERR) {
      spdlog::error("libcoap: {}", text);
    } else if (level == LOG_WARNING && !is_socket_error(text)) {
      spdlog::warn("libcoap: {}", text);
    } else {
      // libcoap's notice/info can name URIs; keep everything below warning at debug.
      spdlog::debug("libcoap: {}", text);
    }
  } catch (...) {
    // Never unwind into libcoap.
  }
}

// Follows spdlog (which the daemon may change on reload): libcoap's chatter, PDU dumps included,
// only when we are debugging; warnings and errors otherwise.
void sync_log_level() {
  coap_set_log_level(spdlog::should_log(spdlog::level::debug) ? LOG_DEBUG : LOG_WARNING);
}

void setup_libcoap_once() {
  static const bool done = [] {
    coap_startup();
    coap_set_log_handler(&coap_log_handler);
    coap_set_show_pdu_output(0);  // PDU dumps go through the handler, not to stdout
    // The OpenSSL layer's alerts and handshake failures are logged only at this level or above;
    // a failed handshake takes its reason from them (g_tls_problem).
    coap_dtls_set_log_level(LOG_WARNING);
    return true;
  }();
  (void)done;
  sync_log_level();
}

// The path segment that is a credential: api/v1/{token}/... and fw|sw/{token}
// (docs/thingsboard-coap.md §0).
std::optional<std::size_t> secret_segment(const std::vector<std::string>& path) {
  // api/v1/{feature}/{digits} is the token-less (X.509) RPC reply, not a token (§0).
  const auto all_digits = [](const std::string& s) {
    return !s.empty() &&
           std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
  };
  if (path.size() == 4 && path[0] == "api" && path[1] == "v1" && all_digits(path[3]))
    return std::nullopt;
  if (path.size() >= 4 && path[0] == "api" && path[1] == "v1") return 2;
  if (path.size() >= 2 && (path[0] == "fw" || path[0] == "sw")) return 1;
  return std::nullopt;
}

std::string path_for_log(const std::vector<std::string>& path) {
  const auto secret = secret_segment(path);
  std::string out;
  for (std::size_t i = 0; i < path.size(); ++i) {
    out += '/';
    out += (secret && *secret == i) ? std::string("<token>") : path[i];
  }
  return out.empty() ? "/" : out;
}

// libcoap verified the chain; the leaf (depth 0) must also be the server we meant. OpenSSL's own
// name check (X509_check_host: every subjectAltName, wildcards by RFC 6125; an IP address
// against IP entries) is taken from the libcrypto that libcoap's OpenSSL build loaded.
int on_server_certificate(const char* cn, const uint8_t* der, size_t der_length, coap_session_t*,
                          unsigned depth, int validated, void* arg) noexcept {
  try {
    const auto* d = static_cast<const DtlsOptions*>(arg);
    if (depth != 0 || !validated) return 1;  // CAs: libcoap and OpenSSL already judged them
    const std::string& name = d->server_name;
    const auto verdict = certificate_names(der, der_length, name);
    if (verdict == NameCheck::Match) return 1;
    if (g_tls_problem.empty()) {
      g_tls_problem = verdict == NameCheck::Mismatch
                          ? "the server's certificate is not for '" + name + "' (it names '" +
                                std::string(cn ? cn : "?") + "')"
                          : "cannot check the name in the server's certificate";
    }
    return 0;
  } catch (...) {
    return 0;
  }
}

bool prepare_libcoap(const std::optional<DtlsOptions>& dtls, std::string* error) {
  if (dtls && dtls->ca_file.empty() && dtls->ca_dir.empty()) {
    *error = "DTLS needs trusted CAs (a CA file or directory)";
    return false;
  }
  if (!load_libcoap(dtls.has_value(), error)) return false;
  if (dtls && !coap_dtls_is_supported()) {
    *error = libcoap().soname + " cannot do DTLS";
    return false;
  }
  setup_libcoap_once();
  return true;
}

bool trust_cas(coap_context_t* ctx, const DtlsOptions& d, std::string* error) {
  // The trust anchors of every DTLS session of this context (SSL_CTX_load_verify_locations).
  if (coap_context_set_pki_root_cas(ctx, d.ca_file.empty() ? nullptr : d.ca_file.c_str(),
                                    d.ca_dir.empty() ? nullptr : d.ca_dir.c_str()))
    return true;
  *error = "cannot load the trusted CAs from " + (d.ca_file.empty() ? d.ca_dir : d.ca_file);
  return false;
}

coap_dtls_pki_t dtls_pki(const DtlsOptions& d) {
  coap_dtls_pki_t pki{};
  pki.version = COAP_DTLS_PKI_SETUP_VERSION;
  pki.verify_peer_cert = 1;   // the chain must lead to a CA given in ca_file/ca_dir
  pki.check_common_ca = 0;    // (that is about a CA shared with our own certificate)
  pki.allow_self_signed = 0;  // a self-signed server is trusted only through ca_file
  pki.allow_expired_certs = 0;
  pki.cert_chain_validation = 1;
  pki.cert_chain_verify_depth = 4;  // leaf, intermediates, root: public CAs need 2-3
  pki.check_cert_revocation = 0;    // no CRL distribution on devices; short-lived certs instead
  pki.validate_cn_call_back = &on_server_certificate;
  pki.cn_call_back_arg = const_cast<DtlsOptions*>(&d);
  // SNI: ThingsBoard's DTLS server ignores it, but a load balancer in front may need it.
  pki.client_sni = const_cast<char*>(d.server_name.c_str());
  pki.pki_key.key_type = COAP_PKI_KEY_PEM;
  pki.pki_key.key.pem.ca_file = nullptr;  // trust comes from coap_context_set_pki_root_cas
  pki.pki_key.key.pem.public_cert = d.cert_file.empty() ? nullptr : d.cert_file.c_str();
  pki.pki_key.key.pem.private_key = d.key_file.empty() ? nullptr : d.key_file.c_str();
  return pki;
}

void reset_tls_problem() { g_tls_problem.clear(); }

std::string tls_failure(const std::string& remote) {
  return "DTLS handshake with " + remote + " failed" +
         (g_tls_problem.empty() ? std::string() : ": " + g_tls_problem);
}

}  // namespace detail

using namespace detail;

namespace {

// Bytes a Uri-Path option takes on the wire (RFC 7252 §3.1): 1 header byte, plus 1 or 2 extended
// length bytes. The option delta is 0 after the first one, 11 (< 13) for the first.
std::size_t option_wire_size(std::size_t len) {
  return 1 + len + (len >= 269 ? 2 : len >= 13 ? 1 : 0);
}

std::string token_key(const coap_bin_const_t& t) {
  return std::string(reinterpret_cast<const char*>(t.s), t.length);
}

const char* method_name(Method m) { return m == Method::Get ? "GET" : "POST"; }

// libcoap's default UDP MTU (COAP_DEFAULT_MTU) - restored for requests that fit in one datagram.
constexpr unsigned kDefaultMtu = 1152;
// Room for Block1 (≤ 3+1), Size1 (≤ 4+1) and Request-Tag (≤ 8+1) that libcoap adds to each block,
// plus the 43 bytes libcoap 4.3.1 keeps free for a possible Echo option (RFC 9175) when it picks
// the block size (block.c, coap_add_data_large_internal).
constexpr std::size_t kBlockOptionRoom = 20;
constexpr std::size_t kEchoRoom = 43;
// docs/thingsboard-coap.md §1: keep each datagram at or under ~1100 bytes.
constexpr std::size_t kMaxDatagram = 1100;
// RFC 7252 §5.3.1: up to 8 bytes; ThingsBoard (Californium) also allows at most 8 (§6.6).
constexpr std::size_t kTokenLength = 8;

coap_fixed_point_t to_fixed(Millis ms) {
  const auto v = static_cast<unsigned>(std::max<Millis::rep>(ms.count(), 1));
  return coap_fixed_point_t{static_cast<uint16_t>(std::min(v / 1000, 65535u)),
                            static_cast<uint16_t>(v % 1000)};
}

}  // namespace

// ---- implementation --------------------------------------------------------------------------

struct Client::Impl {
  struct Pending {
    RequestId id = 0;
    std::string token;  // raw bytes; empty until sent
    std::string rtag;   // Request-Tag libcoap put on every block of a Block1 body, else empty
    Callback callback;
    sd_event_source* timeout = nullptr;
    std::string log_path;
    std::string body;  // Block2 blocks received so far (RFC 7959 §2.4), at most max_response_body
    uint64_t started_us = 0;  // CLOCK_MONOTONIC, for Outcome::elapsed
  };
  struct Ready {
    Callback callback;
    Outcome outcome;
  };

  sd_event* loop = nullptr;
  Endpoint endpoint;
  ClientOptions options;
  coap_address_t remote{};
  std::string remote_text;
  coap_context_t* ctx = nullptr;
  coap_session_t* session = nullptr;
  bool session_broken = false;
  bool recycle_when_idle = false;
  // Set inside a libcoap callback when an exchange libcoap is still driving (a Block2 transfer it
  // keeps asking blocks for) was given up: the session is dropped as soon as libcoap returns.
  bool drop_session_after_io = false;
  sd_event_source* io = nullptr;
  sd_event_source* coap_timer = nullptr;
  sd_event_source* dispatcher = nullptr;
  std::unordered_map<RequestId, Pending> pending;
  std::unordered_map<std::string, RequestId> by_token;
  std::unordered_map<std::string, RequestId> by_rtag;
  std::deque<Ready> ready;
  // Name resolution (docs/coap.md, "Resolving the server's name"): every new session starts from
  // a fresh answer, so a changed DNS record is picked up after a failure. Requests made while the
  // answer is pending wait here (they are in `pending` too, with their timeout running).
  struct AwaitingAddress {
    RequestId id = 0;
    Method method = Method::Get;
    std::vector<std::string> path;
    std::string payload;
  };
  std::unique_ptr<net::Resolver> resolver;
  bool fresh_address = false;  // `remote` is an answer no session has used yet
  bool address_stale = false;  // refresh_address(): ask again before the next request
  std::deque<AwaitingAddress> awaiting_address;
  RequestId next_id = 1;
  bool destroying = false;
  std::set<std::string> secrets_used;  // registered with the log masker until we are gone
  // Survives the Impl, so a callback that destroys the Client does not leave us reading freed
  // memory while we are still inside dispatch().
  std::shared_ptr<bool> alive = std::make_shared<bool>(true);

  ~Impl() {
    destroying = true;
    *alive = false;
    resolver.reset();  // kills a running lookup; its answer would find nobody
    for (auto& [id, p] : pending) {
      sd_event_source_disable_unref(p.timeout);
    }
    pending.clear();
    by_token.clear();
    by_rtag.clear();
    ready.clear();  // documented: no callbacks from the destructor
    // Releasing the session and context makes libcoap nack what is queued and call the release
    // functions of Block1 bodies; the handlers see `destroying` and do nothing else.
    if (session) coap_session_release(session);
    if (ctx) coap_free_context(ctx);
    sd_event_source_disable_unref(io);
    sd_event_source_disable_unref(coap_timer);
    sd_event_source_disable_unref(dispatcher);
    sd_event_unref(loop);
    for (const auto& secret : secrets_used) remove_secret(secret);
  }

  // -- sd-event glue --

  static int on_io(sd_event_source*, int, uint32_t, void* userdata) noexcept {
    try {
      static_cast<Impl*>(userdata)->process();
    } catch (const std::exception& e) {
      spdlog::error("coap: io handler: {}", e.what());
    } catch (...) {
      spdlog::error("coap: io handler: unknown exception");
    }
    return 0;
  }

  static int on_coap_timer(sd_event_source*, uint64_t, void* userdata) noexcept {
    return on_io(nullptr, -1, 0, userdata);
  }

  void process() {
    coap_io_process(ctx, COAP_IO_NO_WAIT);
    if (drop_session_after_io) {
      // libcoap has no call to stop one Block2 transfer: it asks for the next block before our
      // handler sees the current one, and again for every answer. Only dropping the session
      // (which also fails whatever else was in flight on it) stops it.
      drop_session_after_io = false;
      recycle_session();  // rearms
      return;
    }
    rearm();
  }

  // Asks libcoap when it next needs to run (retransmissions, Block1 and Block2 follow-ups, session
  // timeouts) and points our one timer there. coap_io_prepare_epoll also performs whatever is
  // already due, which can nack requests; those only queue outcomes.
  void rearm() {
    coap_tick_t now;
    coap_ticks(&now);
    const unsigned ms = coap_io_prepare_epoll(ctx, now);
    if (ms == 0) {  // nothing scheduled
      sd_event_source_set_enabled(coap_timer, SD_EVENT_OFF);
      return;
    }
    uint64_t usec_now = 0;
    sd_event_now(loop, CLOCK_MONOTONIC, &usec_now);
    sd_event_source_set_time(coap_timer, usec_now + uint64_t{ms} * 1000);
    sd_event_source_set_enabled(coap_timer, SD_EVENT_ONESHOT);
  }

  // Our own deadline for the whole exchange. The source's userdata is the Impl; the request is
  // found by its timer (few requests are ever in flight).
  static int on_request_timeout(sd_event_source* src, uint64_t, void* userdata) noexcept {
    try {
      auto* self = static_cast<Impl*>(userdata);
      for (auto& [id, p] : self->pending) {
        if (p.timeout != src) continue;
        const auto ms = std::chrono::duration_cast<Millis>(self->options.request_timeout).count();
        // libcoap may still be retransmitting or sending blocks; a late answer is ignored
        // because the token is forgotten here.
        self->abandon(
            id, failure(Failure::Timeout, "no response within " + std::to_string(ms) + " ms"));
        break;
      }
    } catch (...) {
      spdlog::error("coap: timeout handler failed");
    }
    return 0;
  }

  static int on_dispatch(sd_event_source*, void* userdata) noexcept {
    auto* self = static_cast<Impl*>(userdata);
    const std::shared_ptr<bool> alive = self->alive;
    try {
      // Drain what is ready now; callbacks may add more (handled on the next iteration) or
      // destroy the Client (then `alive` turns false and we must not touch self again).
      std::deque<Ready> batch;
      batch.swap(self->ready);
      while (!batch.empty()) {
        Ready r = std::move(batch.front());
        batch.pop_front();
        invoke(r);
        if (!*alive) return 0;
      }
      if (!self->ready.empty()) sd_event_source_set_enabled(self->dispatcher, SD_EVENT_ONESHOT);
    } catch (...) {
      spdlog::error("coap: dispatcher failed");
    }
    return 0;
  }

  static void invoke(Ready& r) {
    try {
      if (r.callback) r.callback(r.outcome);
    } catch (const std::exception& e) {
      spdlog::error("coap: request callback threw: {}", e.what());
    } catch (...) {
      spdlog::error("coap: request callback threw");
    }
  }

  // -- completion --

  // Forgets the request and queues its callback for the dispatcher. Never calls user code.
  void complete(RequestId id, Outcome outcome) {
    auto it = pending.find(id);
    if (it == pending.end()) return;
    Pending p = std::move(it->second);
    pending.erase(it);
    if (!p.token.empty()) by_token.erase(p.token);
    // Request-Tags are a per-session counter in libcoap, so a new session may reuse one.
    if (auto r = by_rtag.find(p.rtag); r != by_rtag.end() && r->second == id) by_rtag.erase(r);
    sd_event_source_disable_unref(p.timeout);
    if (recycle_when_idle && pending.empty()) {
      // Maybe inside a libcoap callback: only mark it, ensure_session() replaces it later.
      recycle_when_idle = false;
      session_broken = true;
    }
    if (outcome.response) {
      spdlog::debug("coap: {} -> {}", p.log_path, code_string(outcome.response->code));
    } else {
      spdlog::debug("coap: {} failed: {}", p.log_path, outcome.error);
    }
    if (destroying) return;
    uint64_t now_us = 0;
    sd_event_now(loop, CLOCK_MONOTONIC, &now_us);
    outcome.elapsed = std::chrono::duration_cast<Millis>(
        std::chrono::microseconds(now_us > p.started_us ? now_us - p.started_us : 0));
    ready.push_back(Ready{std::move(p.callback), std::move(outcome)});
    sd_event_source_set_enabled(dispatcher, SD_EVENT_ONESHOT);
  }

  // For a request we give up on while libcoap may still hold it (timeout, cancel). libcoap keeps
  // the unanswered CON and, with NSTART 1 (RFC 7252 §4.7), queues every later request behind it
  // until its own retransmissions run out. Dropping the session flushes it: now if nothing else
  // is in flight, else as soon as the last request is done. Never from inside a libcoap callback.
  void abandon(RequestId id, Outcome outcome) {
    if (!pending.count(id)) return;
    complete(id, std::move(outcome));
    if (pending.empty()) {
      recycle_session();
    } else {
      recycle_when_idle = true;
    }
  }

  static Outcome failure(Failure f, std::string error) {
    Outcome o;
    o.failure = f;
    o.error = std::move(error);
    return o;
  }

  // -- libcoap handlers (all noexcept, all catch) --

  static Impl* from(coap_session_t* s) {
    return static_cast<Impl*>(coap_get_app_data(coap_session_get_context(s)));
  }

  // Gives up on an exchange from inside a libcoap callback because of what the server sent.
  // `libcoap_continues`: libcoap may already have asked for another block of it.
  void protocol_error(RequestId id, std::string why, bool libcoap_continues) {
    spdlog::warn("coap: {}", why);
    complete(id, failure(Failure::Protocol, std::move(why)));
    if (libcoap_continues) drop_session_after_io = true;
  }

  static coap_response_t on_response(coap_session_t* s, const coap_pdu_t* /*sent*/,
                                     const coap_pdu_t* received, const coap_mid_t) noexcept {
    try {
      Impl* self = from(s);
      if (!self || self->destroying) return COAP_RESPONSE_OK;
      self->on_response(received);
    } catch (...) {
      spdlog::error("coap: response handler failed");
    }
    // OK makes libcoap ACK a CON response, including one that arrives before any ACK of our
    // request (docs/thingsboard-coap.md §8).
    return COAP_RESPONSE_OK;
  }

  // libcoap (block mode COAP_BLOCK_USE_LIBCOAP without SINGLE_BODY) hands us every Block2 block
  // with the request's own token, after it has already asked for the next one; we reassemble
  // and cap the body here. Block1 2.31 Continues that carry on a transfer never reach us.
  void on_response(const coap_pdu_t* received) {
    const coap_bin_const_t token = coap_pdu_get_token(received);
    auto it = by_token.find(token_key(token));
    if (it == by_token.end()) {
      // Late answer to a timed-out or canceled request (or a stray): ACK it so the server stops
      // retransmitting, and ignore it.
      spdlog::debug("coap: response with unknown token ignored");
      return;
    }
    const RequestId id = it->second;
    Pending& p = pending.at(id);
    const coap_pdu_code_t code = coap_pdu_get_code(received);
    const int code_num = (code >> 5) * 100 + (code & 0x1f);
    coap_opt_iterator_t opt_iter;
    // libcoap only follows Block2 on 2.xx answers; an error answer is taken as it comes.
    const coap_opt_t* block_opt =
        code_num / 100 == 2 ? coap_check_option(received, COAP_OPTION_BLOCK2, &opt_iter) : nullptr;
    // Block option value: NUM << 4 | M << 3 | SZX (RFC 7959 §2.2).
    const unsigned block_value =
        block_opt ? coap_decode_var_bytes(coap_opt_value(block_opt), coap_opt_length(block_opt))
                  : 0;
    const bool more = block_opt && (block_value & 0x8) != 0;

    if (code_num == 231) {
      // libcoap consumes every 2.31 that continues our Block1 transfer; one that reaches us
      // ended it (no Block1, on the last block, a block number past the body, SZX 7). The
      // server has not confirmed the whole request (RFC 7959 §2.3 "2.31 Continue"; §2.9.1).
      protocol_error(id,
                     "protocol error: server answered 2.31 Continue and no final answer"
                     " (request not confirmed)",
                     more);
      return;
    }
    const std::size_t cap = options.max_response_body;
    if (coap_opt_t* size2 = coap_check_option(received, COAP_OPTION_SIZE2, &opt_iter)) {
      // RFC 7959 §4: the size of the whole answer; refuse at once rather than wait for it.
      const std::uint64_t announced =
          coap_decode_var_bytes8(coap_opt_value(size2), coap_opt_length(size2));
      if (announced > cap) {
        protocol_error(id,
                       "protocol error: server announces a " + std::to_string(announced) +
                           "-byte answer (Size2), over the " + format_size(cap) + " limit",
                       true);
        return;
      }
    }
    std::size_t len = 0;
    const uint8_t* data = nullptr;
    if (!coap_get_data(received, &len, &data) || !data) len = 0;

    Response r;
    r.code = code_num;
    if (block_opt) {
      const unsigned szx = block_value & 0x7;
      const std::uint64_t num = block_value >> 4;
      if (szx == 7) {  // reserved on UDP (BERT is for TCP, RFC 8323 §6)
        protocol_error(id, "protocol error: server sent Block2 with the reserved SZX 7", true);
        return;
      }
      const std::size_t block = std::size_t{1} << (szx + 4);
      if (num * block != p.body.size()) {
        // libcoap asks for blocks in order; anything else is a server that restarts or skips.
        protocol_error(
            id, "protocol error: server sent Block2 block " + std::to_string(num) + " out of order",
            true);
        return;
      }
      if (more && len != block) {  // RFC 7959 §2.2: every non-final block is full size
        protocol_error(id, "protocol error: server sent a short non-final Block2 block", true);
        return;
      }
      if (p.body.size() + len > cap) {
        protocol_error(
            id, "protocol error: server's answer exceeds " + format_size(cap) + " (Block2)", true);
        return;
      }
      p.body.append(reinterpret_cast<const char*>(data), len);
      if (more) return;  // libcoap has asked for the next block already
      r.payload = std::move(p.body);
    } else {
      if (len > cap) {
        protocol_error(id, "protocol error: server's answer exceeds " + format_size(cap), false);
        return;
      }
      r.payload.assign(reinterpret_cast<const char*>(data), len);
    }
    if (coap_opt_t* cf = coap_check_option(received, COAP_OPTION_CONTENT_FORMAT, &opt_iter)) {
      r.content_format =
          static_cast<int>(coap_decode_var_bytes(coap_opt_value(cf), coap_opt_length(cf)));
    }
    if (code_num == 401 && options.dtls) {
      // docs/thingsboard-coap.md §6.2: ThingsBoard looks the client certificate up once, in the
      // handshake, and caches the identity under (client address, certificate). A 4.01 on a DTLS
      // session may be a stale or missing identity: the next request gets a new session, so a
      // fresh full handshake (libcoap starts every new client session without resumption).
      // Requests still in flight here finish first (the session goes when none is left).
      recycle_when_idle = true;
    }
    Outcome o;
    o.response = std::move(r);
    complete(id, std::move(o));
  }

  static void on_nack(coap_session_t* s, const coap_pdu_t* sent, const coap_nack_reason_t reason,
                      const coap_mid_t) noexcept {
    try {
      Impl* self = from(s);
      if (!self || self->destroying) return;
      const char* why = "network error";
      std::string tls_why;
      Failure f = Failure::Network;
      switch (reason) {
        case COAP_NACK_TOO_MANY_RETRIES:
          f = Failure::Timeout;
          why = "no ACK after all retransmissions";
          break;
        case COAP_NACK_RST:
          why = "server reset the request (RST)";
          break;
        case COAP_NACK_ICMP_ISSUE:
          why = "ICMP error (server unreachable)";
          self->session_broken = true;
          // libcoap 4.3.1 keeps the CON in its retransmit queue after an ICMP error: the request
          // we fail now would go on being sent, and reach a server that comes back, on libcoap's
          // schedule instead of our backoff. Drop the session once libcoap has returned.
          if (s == self->session) self->drop_session_after_io = true;
          break;
        case COAP_NACK_TLS_FAILED:
          tls_why = detail::tls_failure(self->remote_text);
          why = tls_why.c_str();
          self->session_broken = true;
          break;
        case COAP_NACK_NOT_DELIVERABLE:
        default:
          why = "could not deliver the request";
          self->session_broken = true;
          break;
      }
      if (!sent) return;
      if (auto id = self->request_of(sent)) self->complete(*id, failure(f, why));
    } catch (...) {
      spdlog::error("coap: nack handler failed");
    }
  }

  // Which request a PDU libcoap sent belongs to. libcoap 4.3.1 gives every Block1 block after the
  // first a token of its own, so blocks are recognised by their Request-Tag (RFC 9175 §3.2).
  std::optional<RequestId> request_of(const coap_pdu_t* sent) const {
    auto it = by_token.find(token_key(coap_pdu_get_token(sent)));
    if (it != by_token.end()) return it->second;
    coap_opt_iterator_t opt_iter;
    if (coap_opt_t* rtag = coap_check_option(sent, COAP_OPTION_RTAG, &opt_iter)) {
      auto r = by_rtag.find(
          std::string(reinterpret_cast<const char*>(coap_opt_value(rtag)), coap_opt_length(rtag)));
      if (r != by_rtag.end()) return r->second;
    }
    return std::nullopt;
  }

  static void release_body(coap_session_t*, void* app_ptr) noexcept {
    delete static_cast<std::string*>(app_ptr);
  }

  // -- session --

  // Never from inside a libcoap callback.
  void recycle_session() {
    recycle_when_idle = false;
    session_broken = true;
    if (!session) return;
    coap_session_t* old = session;
    session = nullptr;
    flush_and_release(old);
    rearm();
  }

  // coap_session_release() alone leaves the CONs libcoap still retransmits alive (its send queue
  // holds a reference), so a request we gave up on could land seconds later, after the caller
  // handled it as failed. Disconnecting first drops them; their nacks find no pending request.
  void flush_and_release(coap_session_t* old) {
    coap_session_disconnected(old, COAP_NACK_NOT_DELIVERABLE);
    coap_session_release(old);
  }

  bool ensure_session(std::string* error) {
    if (session && !session_broken && coap_session_get_state(session) != COAP_SESSION_STATE_NONE) {
      return true;
    }
    if (session) {
      // A failed UDP session (ICMP port unreachable, ...) stays failed; start a fresh one. Anything
      // still queued on it is nacked now and fails as Network.
      coap_session_t* old = session;
      session = nullptr;
      flush_and_release(old);
    }
    spdlog::debug("coap: new {} session to {}", options.dtls ? "DTLS" : "UDP", remote_text);
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
      if (error) *error = "cannot create a CoAP session to " + remote_text;
      return false;
    }
    coap_session_set_ack_timeout(session, to_fixed(options.ack_timeout));
    coap_session_set_max_retransmit(session, static_cast<uint16_t>(options.max_retransmit));
    return true;
  }

  // Bytes of a request before its payload: fixed header, token, Uri-Path options, payload marker.
  static std::size_t header_size(const std::vector<std::string>& path) {
    std::size_t header = 4 + kTokenLength + 1;
    for (const auto& seg : path) header += option_wire_size(seg.size());
    return header;
  }

  // The Block1 size for this path: block_size, halved while a block datagram would exceed
  // kMaxDatagram (only for unusually long paths).
  std::size_t block_for(std::size_t header) const {
    std::size_t block = options.block_size;
    while (block > 16 && header + kBlockOptionRoom + block > kMaxDatagram) block /= 2;
    return block;
  }

  // libcoap sizes PDUs by the session MTU. The block size itself is fixed by the Block1 option we
  // add; the MTU only has to leave libcoap room for a block of that size (it subtracts options
  // and kEchoRoom before choosing, libcoap 4.3.1 block.c coap_add_data_large_internal). Never go
  // below libcoap's default: a smaller MTU also makes libcoap reject 1024-byte Block2 answers.
  void size_mtu(std::size_t header, std::size_t payload, std::size_t block) {
    const std::size_t needed = payload <= options.block_size
                                   ? header + payload + 16
                                   : header + block + kBlockOptionRoom + kEchoRoom;
    coap_session_set_mtu(session,
                         static_cast<unsigned>(std::max<std::size_t>(kDefaultMtu, needed)));
  }

  bool session_usable() const {
    return session && !session_broken && coap_session_get_state(session) != COAP_SESSION_STATE_NONE;
  }

  // Asks for the server's address, unless a lookup is already running. Its answer sends or fails
  // every request waiting for it. The lookup gets 90 % of request_timeout, so a request that waits
  // for a hanging DNS server fails saying so rather than as a plain timeout.
  void resolve() {
    if (resolver->busy()) return;
    const Millis limit = std::max<Millis>(options.request_timeout * 9 / 10, Millis(100));
    resolver->resolve(endpoint.host, endpoint.port, limit,
                      [this](net::Resolution r) { on_resolved(std::move(r)); });
  }

  // From the loop (the resolver's event source), never inside libcoap.
  void on_resolved(net::Resolution r) {
    std::deque<AwaitingAddress> waiting;
    waiting.swap(awaiting_address);
    const bool refreshing = address_stale;
    address_stale = false;
    if (!r.ok() && refreshing && session_usable()) {
      // Only a refresh: the address in use still works, keep it.
      spdlog::debug("coap: cannot resolve {} again ({}); staying on {}", endpoint.host, r.error,
                    remote_text);
    } else if (!r.ok()) {
      const std::string why = "cannot resolve " + endpoint.host + ": " + r.error;
      spdlog::debug("coap: {}", why);
      for (auto& w : waiting) complete(w.id, failure(Failure::Network, why));
      return;
    } else {
      const net::Address& a = r.addresses.front();
      coap_address_t answer;
      coap_address_init(&answer);
      answer.size = a.length;
      std::memcpy(&answer.addr, &a.storage, a.length);
      // A session is bound to its address: a new answer needs a new session.
      if (session && !coap_address_equals(&answer, &remote)) session_broken = true;
      remote = answer;
    }
    char buf[INET6_ADDRSTRLEN + 16] = {};
    coap_print_addr(&remote, reinterpret_cast<unsigned char*>(buf), sizeof(buf) - 1);
    if (remote_text != buf) spdlog::debug("coap: {} is {}", endpoint.host, buf);
    remote_text = buf;
    // An answer the session in use already has (a refresh that changed nothing) needs no session.
    fresh_address = !session_usable();
    for (auto& w : waiting) {
      auto node = pending.extract(w.id);  // gone if it timed out or was canceled meanwhile
      if (!node) continue;
      send(std::move(node.mapped()), w.method, w.path, std::move(w.payload));
    }
  }

  RequestId send(Pending p, Method method, const std::vector<std::string>& path,
                 std::string payload);

  // Fails a request from the loop, never synchronously.
  RequestId fail_later(Pending p, Failure f, std::string error) {
    const RequestId id = p.id;
    pending.emplace(id, std::move(p));
    complete(id, failure(f, std::move(error)));
    return id;
  }
};

std::unique_ptr<Client> Client::create(sd_event* loop, const Endpoint& endpoint,
                                       const ClientOptions& options, std::string* error) {
  auto fail = [&](std::string msg) -> std::unique_ptr<Client> {
    if (error) *error = std::move(msg);
    return nullptr;
  };
  if (!loop) return fail("no event loop");
  if (options.block_size < 16 || options.block_size > 1024 ||
      (options.block_size & (options.block_size - 1)) != 0) {
    // RFC 7959 §2.2: block sizes are 2^(SZX+4), SZX 0..6.
    return fail("block_size must be a power of two between 16 and 1024");
  }
  // libcoap 4.3.1 silently keeps its defaults for these (coap_session.c, set_ack_timeout and
  // set_max_retransmit); say so instead.
  if (options.ack_timeout < std::chrono::seconds(1) ||
      options.ack_timeout > std::chrono::hours(1)) {
    return fail("ack_timeout must be between 1 s and 1 h");
  }
  if (options.max_retransmit < 1 || options.max_retransmit > 20) {
    return fail("max_retransmit must be between 1 and 20");
  }
  if (options.max_response_body < 1024) {
    return fail("max_response_body must be at least 1 KiB");  // one full block (SZX 6)
  }
  if (options.dtls && options.dtls->ca_file.empty() && options.dtls->ca_dir.empty()) {
    return fail("DTLS needs trusted CAs (a CA file or directory)");
  }
  std::string load_error;
  if (!detail::prepare_libcoap(options.dtls, &load_error)) return fail(load_error);

  auto impl = std::make_unique<Impl>();
  impl->loop = sd_event_ref(loop);
  impl->endpoint = endpoint;
  impl->options = options;

  // No lookup here: create() never blocks. The first request resolves the name on the loop.
  impl->remote_text = endpoint.host + ":" + std::to_string(endpoint.port);
  impl->resolver = std::make_unique<net::Resolver>(loop);

  impl->ctx = coap_new_context(nullptr);
  if (!impl->ctx) return fail("cannot create a libcoap context");
  coap_set_app_data(impl->ctx, impl.get());
  if (impl->options.dtls && !detail::trust_cas(impl->ctx, *impl->options.dtls, &load_error)) {
    return fail(load_error);
  }

  // libcoap does RFC 7959 both ways: Block1 for our large bodies, and it asks for the blocks of
  // large answers (Block2). Not COAP_BLOCK_SINGLE_BODY: libcoap would then hold an answer of any
  // size (or its Size2) and keep asking for blocks until request_timeout; on_response sees each
  // block instead and caps the body at max_response_body.
  coap_context_set_block_mode(impl->ctx, COAP_BLOCK_USE_LIBCOAP);
  coap_register_response_handler(impl->ctx, &Impl::on_response);
  coap_register_nack_handler(impl->ctx, &Impl::on_nack);

  const int fd = coap_context_get_coap_fd(impl->ctx);
  if (fd < 0) {
    // Debian's libcoap3 4.3.1 is built with epoll; a build without it cannot be driven this way.
    return fail("libcoap was built without epoll support (coap_context_get_coap_fd failed)");
  }
  int r = sd_event_add_io(loop, &impl->io, fd, EPOLLIN, &Impl::on_io, impl.get());
  if (r < 0) return fail(std::string("sd_event_add_io: ") + std::strerror(-r));
  r = sd_event_add_time(loop, &impl->coap_timer, CLOCK_MONOTONIC, 0, 1000, &Impl::on_coap_timer,
                        impl.get());
  if (r < 0) return fail(std::string("sd_event_add_time: ") + std::strerror(-r));
  sd_event_source_set_enabled(impl->coap_timer, SD_EVENT_OFF);
  r = sd_event_add_defer(loop, &impl->dispatcher, &Impl::on_dispatch, impl.get());
  if (r < 0) return fail(std::string("sd_event_add_defer: ") + std::strerror(-r));
  sd_event_source_set_enabled(impl->dispatcher, SD_EVENT_OFF);
  sd_event_source_set_description(impl->io, "coap-io");
  sd_event_source_set_description(impl->coap_timer, "coap-timer");
  sd_event_source_set_description(impl->dispatcher, "coap-dispatch");

  return std::unique_ptr<Client>(new Client(std::move(impl)));
}

Client::Client(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Client::~Client() = default;

RequestId Client::request(Method method, const std::vector<std::string>& path, std::string payload,
                          Callback callback) {
  Impl& im = *impl_;
  Impl::Pending p;
  p.id = im.next_id++;
  p.callback = std::move(callback);
  p.log_path = path_for_log(path);
  sync_log_level();
  if (const auto s = secret_segment(path); s && im.secrets_used.insert(path[*s]).second) {
    add_secret(path[*s]);
  }
  spdlog::debug("coap: {} {} ({} bytes)", method_name(method), p.log_path, payload.size());

  // Our own deadline for the whole exchange (every retransmission and every block).
  uint64_t now = 0;
  sd_event_now(im.loop, CLOCK_MONOTONIC, &now);
  const auto timeout_us = static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::microseconds>(im.options.request_timeout).count());
  const RequestId id = p.id;
  p.started_us = now;
  const int r = sd_event_add_time(im.loop, &p.timeout, CLOCK_MONOTONIC, now + timeout_us, 10000,
                                  &Impl::on_request_timeout, &im);
  if (r < 0) {
    p.timeout = nullptr;
    return im.fail_later(std::move(p), Failure::Network,
                         std::string("sd_event_add_time: ") + std::strerror(-r));
  }

  if ((!im.session_usable() || im.address_stale) && !im.fresh_address) {
    // A new session needs the server's address first (again after a failure: it may have moved).
    im.awaiting_address.push_back({id, method, path, std::move(payload)});
    im.pending.emplace(id, std::move(p));
    im.resolve();
    return id;
  }
  return im.send(std::move(p), method, path, std::move(payload));
}

RequestId Client::Impl::send(Pending p, Method method, const std::vector<std::string>& path,
                             std::string payload) {
  Impl& im = *this;
  const RequestId id = p.id;
  std::string error;
  if (!im.ensure_session(&error)) return im.fail_later(std::move(p), Failure::Network, error);

  // A fresh random token per request (RFC 7252 §5.3.1), never reused while in flight.
  std::string token(kTokenLength, '\0');
  do {
    coap_prng(token.data(), token.size());
  } while (im.by_token.count(token));

  const coap_pdu_code_t code =
      method == Method::Get ? COAP_REQUEST_CODE_GET : COAP_REQUEST_CODE_POST;
  const std::size_t header = Impl::header_size(path);
  const std::size_t block = im.block_for(header);
  im.size_mtu(header, payload.size(), block);
  coap_pdu_t* pdu = coap_new_pdu(COAP_MESSAGE_CON, code, im.session);  // libcoap's next MID
  if (!pdu) return im.fail_later(std::move(p), Failure::Network, "cannot allocate a PDU");
  bool ok = coap_add_token(pdu, token.size(), reinterpret_cast<const uint8_t*>(token.data()));
  for (const auto& seg : path) {
    ok = ok && coap_add_option(pdu, COAP_OPTION_URI_PATH, seg.size(),
                               reinterpret_cast<const uint8_t*>(seg.data())) != 0;
  }
  if (ok && !payload.empty()) {
    if (payload.size() <= im.options.block_size) {
      ok = coap_add_data(pdu, payload.size(), reinterpret_cast<const uint8_t*>(payload.data()));
    } else {
      // A Block1 option with our SZX makes libcoap cut exactly block_size blocks (it only lowers
      // the size if the MTU is too small, see size_mtu) (RFC 7959 §2.2: size = 2^(SZX+4)).
      const unsigned szx = static_cast<unsigned>(std::countr_zero(block)) - 4;
      uint8_t buf[4];
      ok = coap_add_option(pdu, COAP_OPTION_BLOCK1, coap_encode_var_safe(buf, sizeof(buf), szx),
                           buf) != 0;
      if (ok) {
        // libcoap keeps sending blocks after this call returns, so the body must outlive the
        // Pending entry (a timeout does not stop libcoap); libcoap frees it via release_body, also
        // when the call fails (libcoap 4.3.1 block.c, label fail).
        auto* body = new std::string(std::move(payload));
        ok = coap_add_data_large_request(im.session, pdu, body->size(),
                                         reinterpret_cast<const uint8_t*>(body->data()),
                                         &Impl::release_body, body) != 0;
      }
    }
  }
  if (!ok) {
    coap_delete_pdu(pdu);
    return im.fail_later(std::move(p), Failure::Network, "cannot build the request PDU");
  }
  p.token = token;
  im.by_token.emplace(token, id);
  coap_opt_iterator_t opt_iter;
  if (coap_opt_t* rtag = coap_check_option(pdu, COAP_OPTION_RTAG, &opt_iter)) {
    p.rtag.assign(reinterpret_cast<const char*>(coap_opt_value(rtag)), coap_opt_length(rtag));
    im.by_rtag[p.rtag] = id;
  }
  im.pending.emplace(id, std::move(p));
  if (coap_send(im.session, pdu) == COAP_INVALID_MID) {  // coap_send owns pdu either way
    im.session_broken = true;
    im.complete(id, Impl::failure(Failure::Network, "cannot send to " + im.remote_text));
  }
  im.rearm();
  return id;
}

void Client::cancel(RequestId id) {
  // User code never runs inside libcoap callbacks, so releasing the session here is safe.
  impl_->abandon(id, Impl::failure(Failure::Canceled, "canceled"));
}

void Client::renew_session() {
  if (impl_->pending.empty()) {
    impl_->recycle_session();
  } else {
    impl_->recycle_when_idle = true;
  }
}

void Client::refresh_address() {
  impl_->address_stale = true;
  impl_->fresh_address = false;
}

void Client::cancel_all() {
  std::vector<RequestId> ids;
  ids.reserve(impl_->pending.size());
  for (const auto& [id, p] : impl_->pending) ids.push_back(id);
  std::sort(ids.begin(), ids.end());  // callbacks in request order
  for (RequestId id : ids) cancel(id);
}

std::size_t Client::in_flight() const { return impl_->pending.size(); }

std::unique_ptr<Client> Client::clone(std::string* error) const {
  auto c = create(impl_->loop, impl_->endpoint, impl_->options, error);
  if (c && impl_->remote.size > 0) {  // resolved once: no second lookup for the same name
    c->impl_->remote = impl_->remote;
    c->impl_->remote_text = impl_->remote_text;
    c->impl_->fresh_address = true;
  }
  return c;
}

const Endpoint& Client::endpoint() const { return impl_->endpoint; }

bool check_dtls_files(const DtlsOptions& dtls, std::string* error) {
  try {
    if (!load_libcoap(true, error)) return false;
    return check_pem_files(dtls.ca_file, dtls.cert_file, dtls.key_file, error);
  } catch (const std::exception& e) {
    *error = e.what();
    return false;
  }
}

bool ensure_device_identity(const std::string& key_file, const std::string& cert_file,
                            const std::string& device_name, std::string* error) {
  try {
    std::error_code ec;
    if (std::filesystem::exists(key_file, ec) && std::filesystem::exists(cert_file, ec))
      return true;
    if (!load_libcoap(true, error)) return false;
    if (!generate_identity(key_file, cert_file, device_name, error)) return false;
    spdlog::info("generated the device's key {} (EC P-256) and self-signed certificate {} (CN={})",
                 key_file, cert_file, device_name);
    return true;
  } catch (const std::exception& e) {
    *error = e.what();
    return false;
  }
}

std::string code_string(int code) {
  const int cls = code / 100;
  const int detail = code % 100;
  std::string out = std::to_string(cls) + ".";
  if (detail < 10) out += '0';
  out += std::to_string(detail);
  return out;
}

std::string describe(const Outcome& o) {
  if (o.answered()) return "server answered " + code_string(o.response->code);
  switch (o.failure) {
    case Failure::Timeout:
      return "no answer from the server";
    case Failure::Network:
      return "network error" + (o.error.empty() ? std::string() : ": " + o.error);
    case Failure::Protocol:  // the error says "protocol error: ..."
    default:
      return o.error.empty() ? "request failed" : o.error;
  }
}

}  // namespace tb::coap
