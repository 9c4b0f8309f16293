// Fuzzes what tb::coap::Client makes of the datagrams a server sends back. The target owns a UDP
// socket on 127.0.0.1 that plays the server: the Client (on a real sd-event loop, as in the
// agent) sends it a CON request, and the target answers with datagrams taken from the input.
//
// Input: one byte choosing the request, then up to kMaxDatagrams datagrams separated by "DGRM".
//   request byte: bit 0 GET (else POST); bits 1-2 payload size: 0, 30, 1500 or 3000 bytes (the
//   last two go out with Block1, RFC 7959, so 2.31 Continue answers are explored).
//   each datagram: one flags byte, then the bytes sent. Before sending, the target reads what the
//   Client sent so far; flag bit 0 patches in the message ID of the Client's last CON (so an ACK
//   matches), bit 1 its token (the datagram's own token length nibble and token bytes are replaced,
//   the rest of the datagram follows the token), so both matched answers (piggybacked, Block2
//   follow-ups, CON separate responses) and strays are explored.
// Every outcome must be clean: at most one callback, no crash, no leak, and the loop settles at
// once (nothing here waits for a timer: an unanswered request is dropped with the Client).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include <systemd/sd-event.h>

#include "coap/client.hpp"
#include "fuzz_util.hpp"

namespace {

constexpr std::string_view kSeparator = "DGRM";
constexpr std::size_t kMaxDatagrams = 16;

struct Server {
  int fd = -1;
  std::uint16_t port = 0;
};

Server& server() {
  static Server s = [] {
    Server out;
    out.fd = ::socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (out.fd < 0 || ::bind(out.fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
      std::perror("server socket");
      std::abort();
    }
    socklen_t len = sizeof a;
    ::getsockname(out.fd, reinterpret_cast<sockaddr*>(&a), &len);
    out.port = ntohs(a.sin_port);
    return out;
  }();
  return s;
}

sd_event* loop() {
  static sd_event* e = [] {
    sd_event* ev = nullptr;
    if (sd_event_new(&ev) < 0) std::abort();
    return ev;
  }();
  return e;
}

// Runs everything that is ready now (datagrams already queued on loopback, deferred callbacks),
// without waiting for timers. Bounded, so a handler that keeps re-arming itself cannot hang us.
void pump() {
  for (int i = 0; i < 256; ++i)
    if (sd_event_run(loop(), 0) <= 0) return;
}

// What the Client sent last: where from, and the MID and token of its last CON.
struct Peer {
  sockaddr_in addr{};
  bool known = false;
  std::uint8_t mid[2] = {0, 0};
  std::string token;
};

void drain(Peer& peer) {
  for (;;) {
    std::uint8_t buf[2048];
    sockaddr_in from{};
    socklen_t len = sizeof from;
    const ssize_t n =
        ::recvfrom(server().fd, buf, sizeof buf, 0, reinterpret_cast<sockaddr*>(&from), &len);
    if (n < 0) return;
    peer.addr = from;
    peer.known = true;
    if (n < 4 || ((buf[0] >> 4) & 3) != 0) continue;  // RFC 7252 §3: type 0 = CON
    const std::size_t tkl = buf[0] & 0xf;
    peer.mid[0] = buf[2];
    peer.mid[1] = buf[3];
    if (tkl <= 8 && 4 + tkl <= static_cast<std::size_t>(n))
      peer.token.assign(reinterpret_cast<const char*>(buf + 4), tkl);
  }
}

std::string build(std::string_view segment, const Peer& peer) {
  if (segment.empty()) return {};
  const auto flags = static_cast<std::uint8_t>(segment[0]);
  std::string d(segment.substr(1));
  if ((flags & 2) && d.size() >= 4) {
    const std::size_t tkl = static_cast<std::uint8_t>(d[0]) & 0xf;
    std::string rest = d.substr(std::min(d.size(), 4 + tkl));
    d = d.substr(0, 4);
    d[0] = static_cast<char>((static_cast<std::uint8_t>(d[0]) & 0xf0) | peer.token.size());
    d += peer.token;
    d += rest;
  }
  if ((flags & 1) && d.size() >= 4) {
    d[2] = static_cast<char>(peer.mid[0]);
    d[3] = static_cast<char>(peer.mid[1]);
  }
  return d;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tb::fuzz::quiet_logs();
  (void)server();
  (void)loop();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1) return -1;
  const std::string_view input = tb::fuzz::as_text(data, size);
  const auto request = static_cast<std::uint8_t>(input[0]);
  std::vector<std::string_view> segments;
  for (std::string_view rest = input.substr(1); segments.size() < kMaxDatagrams;) {
    const auto at = rest.find(kSeparator);
    segments.push_back(rest.substr(0, at));
    if (at == std::string_view::npos) break;
    rest.remove_prefix(at + kSeparator.size());
  }

  tb::coap::ClientOptions options;
  options.request_timeout = std::chrono::seconds(30);
  std::string error;
  auto client = tb::coap::Client::create(loop(), {"127.0.0.1", server().port}, options, &error);
  TB_FUZZ_CHECK(client, "Client::create on loopback");

  static constexpr std::size_t kPayloadSizes[] = {0, 30, 1500, 3000};
  std::string payload(kPayloadSizes[(request >> 1) & 3], 'x');
  int calls = 0;
  tb::coap::Outcome outcome;
  client->request((request & 1) ? tb::coap::Method::Get : tb::coap::Method::Post,
                  {"api", "v1", "fuzz-token", "telemetry"}, std::move(payload),
                  [&](const tb::coap::Outcome& o) {
                    ++calls;
                    outcome = o;
                  });

  Peer peer;
  for (const auto segment : segments) {
    pump();
    drain(peer);
    if (!peer.known) break;
    const std::string d = build(segment, peer);
    (void)::sendto(server().fd, d.data(), d.size(), 0,
                   reinterpret_cast<const sockaddr*>(&peer.addr), sizeof peer.addr);
  }
  pump();
  drain(peer);
  TB_FUZZ_CHECK(calls <= 1, "one callback per request");
  // TB_FUZZ_VERBOSE=1 fuzz_coap_response FILE shows what an input does.
  static const bool verbose = std::getenv("TB_FUZZ_VERBOSE") != nullptr;
  if (verbose) {
    std::fprintf(
        stderr, "coap_response: %zu datagram(s), %s%s%s\n", segments.size(),
        calls ? tb::coap::describe(outcome).c_str() : "no callback",
        outcome.answered() ? ", payload " : "",
        outcome.answered() ? std::to_string(outcome.response->payload.size()).c_str() : "");
  }
  if (calls == 1 && outcome.answered()) {
    const int code = outcome.response->code;
    TB_FUZZ_CHECK(code >= 0 && code <= 731, "response code class.detail");
    (void)tb::coap::describe(outcome);
  }
  client.reset();
  pump();
  drain(peer);
  return 0;
}
