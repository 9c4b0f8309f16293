// A confirmable-request CoAP client on the agent's sd-event loop. Only coap/ includes libcoap.
//
// libcoap's epoll fd is an sd-event io source and its next deadline an sd-event timer; nothing
// polls or sleeps. Responses are matched by token, so all of ThingsBoard's framings work:
// piggybacked, empty ACK then separate, and a separate CON response that arrives before any ACK
// (docs/thingsboard-coap.md §8). Payloads over the block size go out with Block1 (RFC 7959).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <systemd/sd-event.h>

#include "util/clock.hpp"

namespace tb::coap {

using namespace std::chrono_literals;

struct Endpoint {
  std::string host;
  std::uint16_t port = 5683;
};

// CoAP over DTLS 1.2 (coaps, RFC 7252 §9). The server's certificate chain is verified against
// the CAs given and its name checked (subjectAltName, else CN); a failed handshake fails the
// requests as Failure::Network with the reason and never falls back to plain coap. Files are read
// at every new session, so renewed certificates are picked up by the next handshake.
struct DtlsOptions {
  std::string ca_file;      // PEM bundle of trusted CAs (and/or ca_dir); at least one
  std::string ca_dir;       // hashed directory (c_rehash)
  std::string server_name;  // the name the server's certificate must carry; also sent as SNI
  std::string cert_file;    // optional X.509 client certificate (PEM) ...
  std::string key_file;     // ... and its private key
  bool operator==(const DtlsOptions&) const = default;
};

struct ClientOptions {
  Millis request_timeout = 30s;   // whole exchange, including every Block1 round trip
  std::size_t block_size = 1024;  // Block1 SZX 6; ThingsBoard's MAX_MESSAGE_SIZE is 1024
                                  // (power of two, 16..1024; RFC 7959 §2.2)
  // CON retransmission (RFC 7252 §4.8 defaults). libcoap gives up after max_retransmit
  // retransmissions (~45 s with these values); request_timeout usually fires first.
  // libcoap 4.3.1 ignores an ack_timeout under 1 s and a max_retransmit of 0, so create()
  // rejects them.
  Millis ack_timeout = 2s;
  unsigned max_retransmit = 4;
  // Largest answer body accepted, Block2 included (RFC 7959 §2.4). ThingsBoard's answers are
  // small (a provisioning answer is ~100 bytes, attribute answers a few KiB), so 16 KiB is
  // plenty; it bounds what a hostile server can make us hold, and the number of block requests
  // of one exchange (16 with 1024-byte blocks, at most 1024 with 16-byte ones). A larger answer,
  // or a Size2 above it, ends the exchange with Failure::Protocol. At least 1024 (create()).
  std::size_t max_response_body = 16 * 1024;
  // Set: coaps. Loads libcoap's OpenSSL build (coap/libcoap.hpp); a process that already uses
  // the plain build cannot switch (create() fails with a sentence).
  std::optional<DtlsOptions> dtls;
};

// CoAP response code as class*100 + detail: 201 = 2.01 Created, 401 = 4.01 Unauthorized.
struct Response {
  int code = 0;
  std::string payload;
  int content_format = -1;  // -1 = absent
};

enum class Failure {
  None,
  Timeout,   // no (final) response within request_timeout
  Network,   // could not send / ICMP unreachable / session failed
  Canceled,  // cancel() or cancel_all(); destroying the Client calls no callbacks at all
  Protocol,  // the server's answer breaks the protocol or our limits: a body over
             // max_response_body, a bad Block2 sequence, or a 2.31 Continue that ends the
             // exchange with no final answer (RFC 7959 §2.3). Worth retrying later.
};

struct Outcome {
  std::optional<Response> response;
  Failure failure = Failure::None;
  std::string error;  // human readable when !response
  // From request() to the answer or failure. Longer than ack_timeout means a datagram was
  // retransmitted (or the server answered late): a congestion signal (RFC 8085 §3.1.3).
  Millis elapsed{0};
  bool answered() const { return response.has_value(); }
};

using Callback = std::function<void(const Outcome&)>;
using RequestId = std::uint64_t;

enum class Method { Get, Post };

class Client {
 public:
  // Never blocks: the host name is resolved on the loop (net::Resolver) before the first request,
  // and again whenever a new session is needed after a failure or a timeout, so a changed DNS
  // answer is picked up. Requests made meanwhile wait for the answer within their
  // request_timeout; a failed lookup fails them as Failure::Network, "cannot resolve HOST: why".
  // Fails (nullptr, *error) only for invalid options or when the loop refuses a source.
  static std::unique_ptr<Client> create(sd_event* loop, const Endpoint& endpoint,
                                        const ClientOptions& options, std::string* error);
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // Sends a CON request to the path segments (each one Uri-Path option). The callback runs exactly
  // once, from the loop, never from inside request(). Exception: when the Client is destroyed,
  // outstanding callbacks are dropped without being called (a destructor must not call back into
  // an owner that is itself being torn down). The callback may call request(), cancel() and even
  // destroy the Client.
  RequestId request(Method method, const std::vector<std::string>& path, std::string payload,
                    Callback callback);
  // The callback gets Failure::Canceled (from the loop, later). Unknown or finished ids are
  // ignored.
  void cancel(RequestId id);
  void cancel_all();
  // Looks the server's name up again before the next request (a reload: the operator may have
  // changed the DNS answer while the old address still answers). A different address gets a new
  // session, and requests still in flight on the old one fail as Failure::Network; the same
  // address, or a lookup that fails, keeps the session as it is.
  void refresh_address();
  // The next request starts a new session: with DTLS a fresh full handshake (no resumption), so
  // ThingsBoard looks our client certificate up again (docs/thingsboard-coap.md §6.2). Now when
  // nothing is in flight, else once the requests in flight are done. A 4.01 over DTLS does this
  // by itself.
  void renew_session();
  // Requests sent and not yet answered, failed or canceled.
  std::size_t in_flight() const;
  // Another client to the same server with the same options, and the address this one resolved
  // (if any): its own socket, session and libcoap context. Several exchanges in flight at once
  // each take one (daemon::Uploader), rather than one session with libcoap's NSTART raised:
  // libcoap 4.3.1 loses a retransmission deadline when a separate response (ThingsBoard's
  // success framing, §8) ends an exchange while others wait in the same context's send queue,
  // and the next one is retransmitted at once (docs/coap.md). Null only if create() would be.
  std::unique_ptr<Client> clone(std::string* error) const;
  const Endpoint& endpoint() const;

 private:
  struct Impl;
  explicit Client(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Loads libcoap's DTLS build and checks that the files of `dtls` can be used: the CA file
// holds certificates, the client certificate is valid now and matches its key. For
// --check-config and start-up, so that a bad file is a configuration error, not a failing
// handshake later. Never throws.
bool check_dtls_files(const DtlsOptions& dtls, std::string* error);

// The device's own X.509 identity for provisioning with X509_CERTIFICATE (docs/security.md):
// when key_file or cert_file is missing, generates an EC P-256 key (0600) and a self-signed
// certificate with CN = device_name, with libcrypto from libcoap's DTLS build. Existing files are
// kept as they are. Never throws.
bool ensure_device_identity(const std::string& key_file, const std::string& cert_file,
                            const std::string& device_name, std::string* error);

// "2.01"
std::string code_string(int code);
// What happened, for logs and LastError: "server answered 5.00", "no answer from the server",
// "network error: ICMP error (server unreachable)", "protocol error: server answered 2.31
// Continue and no final answer".
std::string describe(const Outcome& outcome);

}  // namespace tb::coap
