// Loopback tests of tb::coap::Client against a real libcoap server on the same sd-event loop.
//
//   client ──UDP──▶ Relay (records and parses every datagram, can drop) ──UDP──▶ libcoap server
//
// The relay lets the tests check framing on the wire (CON/ACK types, MIDs, Block1 options, sizes)
// instead of trusting either libcoap end.
#include "coap/client.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <coap3/coap.h>
#include <gtest/gtest.h>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>
#include <systemd/sd-event.h>

#include "../net/private_dns.hpp"

namespace tb::coap {
namespace {

using namespace std::chrono_literals;

// ---- a minimal CoAP datagram parser (RFC 7252 §3) for the relay ----

struct Datagram {
  bool to_server = false;
  std::size_t size = 0;
  int type = -1;  // 0 CON, 1 NON, 2 ACK, 3 RST
  int code = 0;   // class*100+detail
  int mid = -1;
  std::string token;
  std::multimap<int, std::string> options;
  std::string payload;

  bool has(int opt) const { return options.count(opt) > 0; }
  unsigned uint_opt(int opt) const {
    unsigned v = 0;
    auto it = options.find(opt);
    if (it == options.end()) return 0;
    for (unsigned char c : it->second) v = (v << 8) | c;
    return v;
  }
};

Datagram parse(const unsigned char* b, std::size_t n, bool to_server) {
  Datagram d;
  d.to_server = to_server;
  d.size = n;
  if (n < 4) return d;
  d.type = (b[0] >> 4) & 3;
  const std::size_t tkl = b[0] & 0xf;
  d.code = (b[1] >> 5) * 100 + (b[1] & 0x1f);
  d.mid = (b[2] << 8) | b[3];
  std::size_t i = 4;
  if (i + tkl > n) return d;
  d.token.assign(reinterpret_cast<const char*>(b + i), tkl);
  i += tkl;
  int number = 0;
  auto ext = [&](unsigned v) -> unsigned {
    if (v == 13) return 13 + b[i++];
    if (v == 14) {
      unsigned x = 269 + ((b[i] << 8) | b[i + 1]);
      i += 2;
      return x;
    }
    return v;
  };
  while (i < n && b[i] != 0xff) {
    const unsigned delta_nib = b[i] >> 4, len_nib = b[i] & 0xf;
    ++i;
    const unsigned delta = ext(delta_nib);
    const unsigned len = ext(len_nib);
    number += static_cast<int>(delta);
    if (i + len > n) break;
    d.options.emplace(number, std::string(reinterpret_cast<const char*>(b + i), len));
    i += len;
  }
  if (i < n && b[i] == 0xff) d.payload.assign(reinterpret_cast<const char*>(b + i + 1), n - i - 1);
  return d;
}

constexpr int kCon = 0, kNon = 1, kAck = 2;
constexpr int kOptUriPath = 11, kOptBlock1 = 27, kOptBlock2 = 23;

int bind_udp(uint16_t port = 0) {
  int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(port);
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

uint16_t local_port(int fd) {
  sockaddr_in a{};
  socklen_t len = sizeof a;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  return ntohs(a.sin_port);
}

// A port nobody listens on (bound once, then closed), so the kernel answers ICMP unreachable.
uint16_t free_port() {
  int fd = bind_udp();
  uint16_t p = local_port(fd);
  close(fd);
  return p;
}

// ---- the relay ----

class Relay {
 public:
  Relay(sd_event* loop, uint16_t server_port) : server_port_(server_port) {
    front_ = bind_udp();
    back_ = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    sockaddr_in s{};
    s.sin_family = AF_INET;
    s.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    s.sin_port = htons(server_port_);
    connect(back_, reinterpret_cast<sockaddr*>(&s), sizeof s);
    sd_event_add_io(loop, &front_src_, front_, EPOLLIN, &Relay::on_front, this);
    sd_event_add_io(loop, &back_src_, back_, EPOLLIN, &Relay::on_back, this);
  }
  ~Relay() {
    sd_event_source_disable_unref(front_src_);
    sd_event_source_disable_unref(back_src_);
    close(front_);
    close(back_);
  }
  uint16_t port() const { return local_port(front_); }

  std::vector<Datagram> log;
  bool drop = false;       // swallow everything: the server never answers
  int forward_limit = -1;  // >= 0: forward only that many client datagrams, then drop everything
  bool reset = false;
  // > 0: the answer_nth-th client CON is answered here with a piggybacked ACK of answer_code.
  int answer_nth = 0;
  int answer_code = 408;  // answer every CON with RST (RFC 7252 §4.2), like a peer that rejects it

  std::vector<Datagram> where(const std::function<bool(const Datagram&)>& pred) const {
    std::vector<Datagram> out;
    for (const auto& d : log)
      if (pred(d)) out.push_back(d);
    return out;
  }

 private:
  static int on_front(sd_event_source*, int fd, uint32_t, void* ud) {
    auto* self = static_cast<Relay*>(ud);
    unsigned char buf[4096];
    sockaddr_in from{};
    socklen_t len = sizeof from;
    const ssize_t n = recvfrom(fd, buf, sizeof buf, 0, reinterpret_cast<sockaddr*>(&from), &len);
    if (n <= 0) return 0;
    self->client_ = from;
    self->have_client_ = true;
    self->log.push_back(parse(buf, static_cast<std::size_t>(n), true));
    if (self->answer_nth > 0 && n >= 4 && ((buf[0] >> 4) & 3) == kCon && --self->answer_nth == 0) {
      // Same MID and token, type ACK, the given code, no options or payload.
      const std::size_t tkl = buf[0] & 0xf;
      unsigned char ack[12] = {
          static_cast<unsigned char>(0x60 | tkl),
          static_cast<unsigned char>(((self->answer_code / 100) << 5) | (self->answer_code % 100)),
          buf[2], buf[3]};
      std::memcpy(ack + 4, buf + 4, tkl);
      sendto(fd, ack, 4 + tkl, 0, reinterpret_cast<sockaddr*>(&from), len);
      return 0;
    }
    if (self->reset && n >= 4 && ((buf[0] >> 4) & 3) == kCon) {
      const unsigned char rst[4] = {0x70, 0x00, buf[2], buf[3]};  // ver 1, RST, 0.00, same MID
      sendto(fd, rst, sizeof rst, 0, reinterpret_cast<sockaddr*>(&from), len);
      return 0;
    }
    if (self->forward_limit == 0) self->drop = true;
    if (self->forward_limit > 0) --self->forward_limit;
    if (!self->drop) send(self->back_, buf, static_cast<std::size_t>(n), 0);
    return 0;
  }
  static int on_back(sd_event_source*, int fd, uint32_t, void* ud) {
    auto* self = static_cast<Relay*>(ud);
    unsigned char buf[4096];
    const ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n <= 0 || !self->have_client_) return 0;
    self->log.push_back(parse(buf, static_cast<std::size_t>(n), false));
    if (!self->drop)
      sendto(self->front_, buf, static_cast<std::size_t>(n), 0,
             reinterpret_cast<sockaddr*>(&self->client_), sizeof self->client_);
    return 0;
  }

  uint16_t server_port_;
  int front_ = -1, back_ = -1;
  sd_event_source* front_src_ = nullptr;
  sd_event_source* back_src_ = nullptr;
  sockaddr_in client_{};
  bool have_client_ = false;
};

// ---- the libcoap test server ----

// An unusually long path: 1024-byte blocks plus this header would exceed ~1100-byte datagrams.
const std::string& long_segment() {
  static const std::string s(120, 'L');
  return s;
}
const std::string& long_echo_path() {
  static const std::string s = "echo/" + long_segment();  // libcoap keeps the pointer
  return s;
}

class Server {
 public:
  Server(sd_event* loop, uint16_t port) : loop_(loop) {
    ctx_ = coap_new_context(nullptr);
    coap_set_app_data(ctx_, this);
    coap_context_set_block_mode(ctx_, COAP_BLOCK_USE_LIBCOAP | COAP_BLOCK_SINGLE_BODY);
    coap_address_t addr;
    coap_address_init(&addr);
    addr.size = sizeof(sockaddr_in);
    addr.addr.sin.sin_family = AF_INET;
    addr.addr.sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.addr.sin.sin_port = htons(port);
    ok_ = coap_new_endpoint(ctx_, &addr, COAP_PROTO_UDP) != nullptr;

    add("piggy", COAP_REQUEST_POST, &Server::piggy);
    add("api/v1/SECRETTOKEN42/telemetry", COAP_REQUEST_POST, &Server::piggy);
    add("separate", COAP_REQUEST_POST, &Server::separate);
    add("separate_non", COAP_REQUEST_POST, &Server::separate);
    add("con_noack", COAP_REQUEST_POST, &Server::con_noack);
    add("e400", COAP_REQUEST_POST, &Server::error_code);
    add("e401", COAP_REQUEST_POST, &Server::error_code);
    add("e500", COAP_REQUEST_POST, &Server::error_code);
    add("echo", COAP_REQUEST_POST, &Server::echo);
    add(long_echo_path().c_str(), COAP_REQUEST_POST, &Server::echo);
    add("attrs", COAP_REQUEST_GET, &Server::attrs);
    add("big", COAP_REQUEST_GET, &Server::big);

    sd_event_add_io(loop, &io_, coap_context_get_coap_fd(ctx_), EPOLLIN, &Server::on_io, this);
    sd_event_add_time(loop, &timer_, CLOCK_MONOTONIC, 0, 1000, &Server::on_timer, this);
    rearm();
  }
  ~Server() {
    sd_event_source_disable_unref(io_);
    sd_event_source_disable_unref(timer_);
    coap_free_context(ctx_);
  }
  bool ok() const { return ok_; }

  std::string last_body;  // body of the last "echo" request, reassembled
  int handled = 0;

 private:
  void add(const char* path, coap_request_t method, coap_method_handler_t h) {
    coap_resource_t* r = coap_resource_init(coap_make_str_const(path), 0);
    coap_register_request_handler(r, method, h);
    coap_add_resource(ctx_, r);
  }
  static Server* self(coap_session_t* s) {
    return static_cast<Server*>(coap_get_app_data(coap_session_get_context(s)));
  }
  static int on_io(sd_event_source*, int, uint32_t, void* ud) {
    auto* s = static_cast<Server*>(ud);
    coap_io_process(s->ctx_, COAP_IO_NO_WAIT);
    s->rearm();
    return 0;
  }
  static int on_timer(sd_event_source*, uint64_t, void* ud) { return on_io(nullptr, 0, 0, ud); }
  void rearm() {
    coap_tick_t now;
    coap_ticks(&now);
    unsigned ms = coap_io_prepare_epoll(ctx_, now);
    if (ms == 0) {
      sd_event_source_set_enabled(timer_, SD_EVENT_OFF);
      return;
    }
    uint64_t t;
    sd_event_now(loop_, CLOCK_MONOTONIC, &t);
    sd_event_source_set_time(timer_, t + ms * 1000ull);
    sd_event_source_set_enabled(timer_, SD_EVENT_ONESHOT);
  }

  static void piggy(coap_resource_t*, coap_session_t* s, const coap_pdu_t*, const coap_string_t*,
                    coap_pdu_t* resp) {
    ++self(s)->handled;
    coap_pdu_set_code(resp, COAP_RESPONSE_CODE_CREATED);
  }
  // libcoap async: the first call registers and returns without a code, which makes libcoap send
  // an empty ACK; 100 ms later the handler runs again and the answer goes out separately.
  static void separate(coap_resource_t* r, coap_session_t* s, const coap_pdu_t* req,
                       const coap_string_t*, coap_pdu_t* resp) {
    if (!coap_find_async(s, coap_pdu_get_token(req))) {
      coap_register_async(s, req, COAP_TICKS_PER_SECOND / 10);
      return;
    }
    ++self(s)->handled;
    // libcoap sends the delayed answer as CON (the request was CON); "separate_non" makes it NON.
    if (coap_resource_get_uri_path(r)->length > 8) coap_pdu_set_type(resp, COAP_MESSAGE_NON);
    coap_pdu_set_code(resp, COAP_RESPONSE_CODE_CREATED);
    coap_add_data(resp, 4, reinterpret_cast<const uint8_t*>("late"));
  }
  // What ThingsBoard does for 2.01 today (docs/thingsboard-coap.md §8): no ACK at all, the answer
  // as a CON of its own with a fresh MID.
  static void con_noack(coap_resource_t*, coap_session_t* s, const coap_pdu_t* req,
                        const coap_string_t*, coap_pdu_t* resp) {
    auto* me = self(s);
    ++me->handled;
    size_t len = 0, off = 0, total = 0;
    const uint8_t* data = nullptr;
    if (coap_get_data_large(req, &len, &data, &off, &total))
      me->last_body.assign(reinterpret_cast<const char*>(data), len);
    coap_pdu_set_type(resp, COAP_MESSAGE_CON);
    coap_pdu_set_mid(resp, coap_new_message_id(s));
    coap_pdu_set_code(resp, COAP_RESPONSE_CODE_CREATED);
  }
  static void error_code(coap_resource_t* r, coap_session_t* s, const coap_pdu_t*,
                         const coap_string_t*, coap_pdu_t* resp) {
    ++self(s)->handled;
    coap_str_const_t* name = coap_resource_get_uri_path(r);
    const int code =
        std::stoi(std::string(reinterpret_cast<const char*>(name->s) + 1, name->length - 1));
    coap_pdu_set_code(resp, static_cast<coap_pdu_code_t>(COAP_RESPONSE_CODE(code)));
  }
  static void echo(coap_resource_t* r, coap_session_t* s, const coap_pdu_t* req,
                   const coap_string_t* query, coap_pdu_t* resp) {
    auto* me = self(s);
    ++me->handled;
    size_t len = 0, off = 0, total = 0;
    const uint8_t* data = nullptr;
    coap_get_data_large(req, &len, &data, &off, &total);
    me->last_body.assign(reinterpret_cast<const char*>(data), len);
    coap_pdu_set_code(resp, COAP_RESPONSE_CODE_CHANGED);
    // Echo the body back: over one block it goes out with Block2 (RFC 7959 §2.4).
    auto* copy = new std::string(me->last_body);
    coap_add_data_large_response(
        r, s, req, resp, query, COAP_MEDIATYPE_APPLICATION_OCTET_STREAM, -1, 0, copy->size(),
        reinterpret_cast<const uint8_t*>(copy->data()),
        [](coap_session_t*, void* p) { delete static_cast<std::string*>(p); }, copy);
  }
  static void attrs(coap_resource_t* r, coap_session_t* s, const coap_pdu_t* req,
                    const coap_string_t* query, coap_pdu_t* resp) {
    ++self(s)->handled;
    coap_pdu_set_code(resp, COAP_RESPONSE_CODE_CONTENT);
    static const char body[] = R"({"shared":{"a":1}})";
    coap_add_data_large_response(r, s, req, resp, query, COAP_MEDIATYPE_APPLICATION_JSON, -1, 0,
                                 sizeof body - 1, reinterpret_cast<const uint8_t*>(body), nullptr,
                                 nullptr);
  }
  static void big(coap_resource_t* r, coap_session_t* s, const coap_pdu_t* req,
                  const coap_string_t* query, coap_pdu_t* resp) {
    ++self(s)->handled;
    static const std::string body = [] {
      std::string b;
      for (int i = 0; b.size() < 6000; ++i) b += std::to_string(i) + ",";
      return b;
    }();
    coap_pdu_set_code(resp, COAP_RESPONSE_CODE_CONTENT);
    coap_add_data_large_response(r, s, req, resp, query, COAP_MEDIATYPE_TEXT_PLAIN, -1, 0,
                                 body.size(), reinterpret_cast<const uint8_t*>(body.data()),
                                 nullptr, nullptr);
  }

  sd_event* loop_;
  coap_context_t* ctx_ = nullptr;
  sd_event_source* io_ = nullptr;
  sd_event_source* timer_ = nullptr;
  bool ok_ = false;
};

// ---- a hostile server: answers every CON with a piggybacked ACK the test scripts ----

struct Answer {
  int code = 201;
  std::vector<std::pair<int, std::string>> options;  // ascending option numbers
  std::string payload;
};

std::string uint_value(unsigned v) {
  std::string out;
  while (v) {
    out.insert(out.begin(), static_cast<char>(v & 0xff));
    v >>= 8;
  }
  return out;
}

// RFC 7252 §3: header, token, options (delta/length nibbles with extensions), payload.
std::string encode_ack(const Datagram& req, const Answer& a) {
  std::string out;
  out += static_cast<char>(0x60 | req.token.size());  // ver 1, ACK
  out += static_cast<char>(((a.code / 100) << 5) | (a.code % 100));
  out += static_cast<char>(req.mid >> 8);
  out += static_cast<char>(req.mid & 0xff);
  out += req.token;
  int last = 0;
  auto nibble = [](unsigned v, std::string& ext) -> unsigned {
    if (v < 13) return v;
    if (v < 269) {
      ext += static_cast<char>(v - 13);
      return 13;
    }
    ext += static_cast<char>((v - 269) >> 8);
    ext += static_cast<char>((v - 269) & 0xff);
    return 14;
  };
  for (const auto& [number, value] : a.options) {
    std::string ext_delta, ext_len;
    const unsigned d = nibble(static_cast<unsigned>(number - last), ext_delta);
    const unsigned l = nibble(static_cast<unsigned>(value.size()), ext_len);
    out += static_cast<char>((d << 4) | l);
    out += ext_delta + ext_len + value;
    last = number;
  }
  if (!a.payload.empty()) out += '\xff' + a.payload;
  return out;
}

class HostileServer {
 public:
  using Script = std::function<std::optional<Answer>(const Datagram&)>;
  HostileServer(sd_event* loop, Script script) : script_(std::move(script)) {
    fd_ = bind_udp();
    sd_event_add_io(loop, &src_, fd_, EPOLLIN, &HostileServer::on_io, this);
  }
  ~HostileServer() {
    sd_event_source_disable_unref(src_);
    close(fd_);
  }
  uint16_t port() const { return local_port(fd_); }
  std::vector<Datagram> requests;  // every CON request received

 private:
  static int on_io(sd_event_source*, int fd, uint32_t, void* ud) {
    auto* self = static_cast<HostileServer*>(ud);
    unsigned char buf[4096];
    sockaddr_in from{};
    socklen_t len = sizeof from;
    const ssize_t n = recvfrom(fd, buf, sizeof buf, 0, reinterpret_cast<sockaddr*>(&from), &len);
    if (n <= 0) return 0;
    const Datagram d = parse(buf, static_cast<std::size_t>(n), true);
    if (d.type != kCon || d.code == 0) return 0;  // ACKs of our CONs, pings
    self->requests.push_back(d);
    if (auto a = self->script_(d)) {
      const std::string out = encode_ack(d, *a);
      sendto(fd, out.data(), out.size(), 0, reinterpret_cast<sockaddr*>(&from), len);
    }
    return 0;
  }
  Script script_;
  int fd_ = -1;
  sd_event_source* src_ = nullptr;
};

constexpr int kOptSize2 = 28;

// 2.01 with Block2 M=1 for whatever block is asked for, forever (issue 8, item 1).
Answer endless_block2(const Datagram& req, std::optional<unsigned> size2 = std::nullopt) {
  const unsigned num = req.has(kOptBlock2) ? req.uint_opt(kOptBlock2) >> 4 : 0;
  Answer a;
  a.code = 201;
  a.options.emplace_back(kOptBlock2, uint_value((num << 4) | 0x8 | 6));
  if (size2) a.options.emplace_back(kOptSize2, uint_value(*size2));
  a.payload.assign(1024, 'x');
  return a;
}

// ---- fixture ----

class CoapClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_GE(sd_event_new(&loop_), 0);
    server_port_ = free_port();
    server_ = std::make_unique<Server>(loop_, server_port_);
    ASSERT_TRUE(server_->ok());
    relay_ = std::make_unique<Relay>(loop_, server_port_);
  }
  void TearDown() override {
    client_.reset();
    relay_.reset();
    server_.reset();
    sd_event_unref(loop_);
  }

  std::unique_ptr<Client> make_client(ClientOptions opts = {}, uint16_t port = 0) {
    std::string error;
    auto c =
        Client::create(loop_, Endpoint{"127.0.0.1", port ? port : relay_->port()}, opts, &error);
    EXPECT_TRUE(c) << error;
    return c;
  }

  // Runs the loop until pred() or the deadline; returns pred().
  bool run_until(const std::function<bool()>& pred, std::chrono::milliseconds limit = 5s) {
    const auto end = std::chrono::steady_clock::now() + limit;
    while (!pred()) {
      if (std::chrono::steady_clock::now() >= end) return false;
      sd_event_run(loop_, 20'000);
    }
    return true;
  }
  void run_for(std::chrono::milliseconds d) {
    run_until([] { return false; }, d);
  }

  // One request, waited for; counts callbacks so "exactly once" is checked everywhere.
  Outcome call(Client& c, Method m, std::vector<std::string> path, std::string payload = {},
               std::chrono::milliseconds limit = 5s) {
    int calls = 0;
    Outcome out;
    c.request(m, path, std::move(payload), [&](const Outcome& o) {
      ++calls;
      out = o;
    });
    EXPECT_EQ(calls, 0) << "callback ran inside request()";
    EXPECT_TRUE(run_until([&] { return calls > 0; }, limit));
    run_for(50ms);
    EXPECT_EQ(calls, 1);
    return out;
  }

  sd_event* loop_ = nullptr;
  uint16_t server_port_ = 0;
  std::unique_ptr<Server> server_;
  std::unique_ptr<Relay> relay_;
  std::unique_ptr<Client> client_;
};

TEST(CoapCodeString, Formats) {
  EXPECT_EQ(code_string(201), "2.01");
  EXPECT_EQ(code_string(205), "2.05");
  EXPECT_EQ(code_string(400), "4.00");
  EXPECT_EQ(code_string(413), "4.13");
  EXPECT_EQ(code_string(500), "5.00");
}

TEST_F(CoapClientTest, PiggybackedCreated) {
  client_ = make_client();
  const Outcome o = call(*client_, Method::Post, {"piggy"}, R"({"t":1})");
  ASSERT_TRUE(o.answered()) << o.error;
  EXPECT_EQ(o.response->code, 201);
  EXPECT_EQ(o.response->content_format, -1);
  EXPECT_EQ(o.failure, Failure::None);
  EXPECT_EQ(client_->in_flight(), 0u);
  // On the wire: one CON POST, answered by a piggybacked ACK 2.01 with the same MID and token.
  const auto req = relay_->where([](auto& d) { return d.to_server && d.type == kCon; });
  const auto ack = relay_->where([](auto& d) { return !d.to_server && d.type == kAck; });
  ASSERT_EQ(req.size(), 1u);
  ASSERT_EQ(ack.size(), 1u);
  EXPECT_EQ(req[0].code, 2);  // 0.02 POST
  EXPECT_EQ(ack[0].code, 201);
  EXPECT_EQ(ack[0].mid, req[0].mid);
  EXPECT_EQ(ack[0].token, req[0].token);
  EXPECT_EQ(req[0].token.size(), 8u);
}

TEST_F(CoapClientTest, PathSegmentsAreSeparateUriPathOptions) {
  client_ = make_client();
  const Outcome o = call(*client_, Method::Post, {"api", "v1", "SECRETTOKEN42", "telemetry"}, "{}");
  ASSERT_TRUE(o.answered()) << o.error;
  EXPECT_EQ(o.response->code, 201);
  const auto req = relay_->where([](auto& d) { return d.to_server && d.type == kCon; });
  ASSERT_EQ(req.size(), 1u);
  std::vector<std::string> segs;
  for (auto [it, end] = req[0].options.equal_range(kOptUriPath); it != end; ++it)
    segs.push_back(it->second);
  EXPECT_EQ(segs, (std::vector<std::string>{"api", "v1", "SECRETTOKEN42", "telemetry"}));
}

TEST_F(CoapClientTest, TokensAndMidsAreFreshPerRequest) {
  client_ = make_client();
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(call(*client_, Method::Post, {"piggy"}, "x").answered());
  const auto req = relay_->where([](auto& d) { return d.to_server && d.type == kCon; });
  ASSERT_EQ(req.size(), 3u);
  EXPECT_NE(req[0].token, req[1].token);
  EXPECT_NE(req[1].token, req[2].token);
  EXPECT_NE(req[0].mid, req[1].mid);
  EXPECT_NE(req[1].mid, req[2].mid);
}

TEST_F(CoapClientTest, EmptyAckThenSeparateResponse) {
  client_ = make_client();
  const Outcome o = call(*client_, Method::Post, {"separate"}, "x");
  ASSERT_TRUE(o.answered()) << o.error;
  EXPECT_EQ(o.response->code, 201);
  EXPECT_EQ(o.response->payload, "late");
  // Wire: empty ACK first, then the answer as its own message, which the client ACKs.
  const auto from_server = relay_->where([](auto& d) { return !d.to_server; });
  ASSERT_GE(from_server.size(), 2u);
  EXPECT_EQ(from_server[0].type, kAck);
  EXPECT_EQ(from_server[0].code, 0);
  EXPECT_EQ(from_server[1].code, 201);
  EXPECT_EQ(from_server[1].type, kCon);
  const int mid = from_server[1].mid;
  EXPECT_EQ(
      relay_->where([&](auto& d) { return d.to_server && d.type == kAck && d.mid == mid; }).size(),
      1u);
}

TEST_F(CoapClientTest, EmptyAckThenSeparateNonResponse) {
  client_ = make_client();
  const Outcome o = call(*client_, Method::Post, {"separate_non"}, "x");
  ASSERT_TRUE(o.answered()) << o.error;
  EXPECT_EQ(o.response->code, 201);
  const auto from_server = relay_->where([](auto& d) { return !d.to_server; });
  ASSERT_EQ(from_server.size(), 2u);
  EXPECT_EQ(from_server[0].type, kAck);
  EXPECT_EQ(from_server[1].type, kNon);
  EXPECT_EQ(from_server[1].code, 201);
}

TEST_F(CoapClientTest, SeparateConResponseWithoutAckIsTheAnswer) {
  ClientOptions opts;
  opts.ack_timeout = 1s;  // a retransmission, if any, would come within 1.5 s
  client_ = make_client(opts);
  const Outcome o = call(*client_, Method::Post, {"con_noack"}, "x");
  ASSERT_TRUE(o.answered()) << o.error;
  EXPECT_EQ(o.response->code, 201);
  // Stay around past the retransmission window: no retransmitted request, no failure.
  run_for(2500ms);
  const auto reqs = relay_->where([](auto& d) { return d.to_server && d.type == kCon; });
  const auto from_server = relay_->where([](auto& d) { return !d.to_server; });
  ASSERT_GE(from_server.size(), 1u);
  // The server really sent a CON 2.01 with a MID of its own, and no ACK before it.
  EXPECT_EQ(from_server[0].type, kCon);
  EXPECT_EQ(from_server[0].code, 201);
  ASSERT_GE(reqs.size(), 1u);
  EXPECT_NE(from_server[0].mid, reqs[0].mid);
  EXPECT_EQ(from_server[0].token, reqs[0].token);
  // We ACKed the server's CON.
  const int smid = from_server[0].mid;
  EXPECT_GE(
      relay_->where([&](auto& d) { return d.to_server && d.type == kAck && d.mid == smid; }).size(),
      1u);
  EXPECT_EQ(reqs.size(), 1u) << "the request was retransmitted after its answer arrived";
  EXPECT_EQ(server_->handled, 1);
  EXPECT_EQ(client_->in_flight(), 0u);
}

TEST_F(CoapClientTest, ErrorCodes) {
  client_ = make_client();
  for (int code : {400, 401, 500}) {
    const Outcome o = call(*client_, Method::Post, {"e" + std::to_string(code)}, "{}");
    ASSERT_TRUE(o.answered()) << o.error;
    EXPECT_EQ(o.response->code, code);
    EXPECT_EQ(o.failure, Failure::None);
  }
  const Outcome nf = call(*client_, Method::Post, {"nope"}, "{}");
  ASSERT_TRUE(nf.answered());
  EXPECT_EQ(nf.response->code, 404);
}

TEST_F(CoapClientTest, GetWithContentFormat) {
  client_ = make_client();
  const Outcome o = call(*client_, Method::Get, {"attrs"});
  ASSERT_TRUE(o.answered()) << o.error;
  EXPECT_EQ(o.response->code, 205);
  EXPECT_EQ(o.response->content_format, 50);
  EXPECT_EQ(o.response->payload, R"({"shared":{"a":1}})");
  const auto req = relay_->where([](auto& d) { return d.to_server && d.type == kCon; });
  ASSERT_EQ(req.size(), 1u);
  EXPECT_EQ(req[0].code, 1);  // 0.01 GET
}

TEST_F(CoapClientTest, NoAnswerTimesOut) {
  relay_->drop = true;
  ClientOptions opts;
  opts.request_timeout = 300ms;
  client_ = make_client(opts);
  const auto t0 = std::chrono::steady_clock::now();
  const Outcome o = call(*client_, Method::Post, {"piggy"}, "x");
  EXPECT_FALSE(o.answered());
  EXPECT_EQ(o.failure, Failure::Timeout);
  EXPECT_GE(std::chrono::steady_clock::now() - t0, 290ms);
  EXPECT_EQ(client_->in_flight(), 0u);
}

// libcoap sends one CON at a time (NSTART 1) and keeps an unanswered one for ~45 s; after our
// timeout the next request must not wait behind it.
TEST_F(CoapClientTest, RequestAfterTimeoutIsNotStuckBehindIt) {
  relay_->drop = true;
  ClientOptions opts;
  opts.request_timeout = 300ms;
  client_ = make_client(opts);
  int calls = 0;
  Failure fa = Failure::None, fb = Failure::None;
  client_->request(Method::Post, {"piggy"}, "a",
                   [&](const Outcome& o) { ++calls, fa = o.failure; });
  client_->request(Method::Post, {"piggy"}, "b",
                   [&](const Outcome& o) { ++calls, fb = o.failure; });
  ASSERT_TRUE(run_until([&] { return calls == 2; }));
  EXPECT_EQ(fa, Failure::Timeout);
  EXPECT_EQ(fb, Failure::Timeout);
  relay_->drop = false;
  const auto t0 = std::chrono::steady_clock::now();
  const Outcome o = call(*client_, Method::Post, {"piggy"}, "c");
  ASSERT_TRUE(o.answered()) << o.error;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 250ms);
  EXPECT_EQ(server_->handled, 1);
}

TEST_F(CoapClientTest, RetransmissionsExhaustedIsTimeout) {
  relay_->drop = true;
  ClientOptions opts;
  opts.request_timeout = 20s;
  opts.ack_timeout = 1s;
  opts.max_retransmit = 1;
  client_ = make_client(opts);
  const Outcome o = call(*client_, Method::Post, {"piggy"}, "x", 8s);
  EXPECT_EQ(o.failure, Failure::Timeout) << o.error;
  // The original and exactly one retransmission with the same MID.
  const auto req = relay_->where([](auto& d) { return d.to_server && d.type == kCon; });
  ASSERT_EQ(req.size(), 2u);
  EXPECT_EQ(req[0].mid, req[1].mid);
}

TEST_F(CoapClientTest, ResetIsNetworkFailure) {
  relay_->reset = true;
  client_ = make_client();
  const Outcome o = call(*client_, Method::Post, {"piggy"}, "x");
  EXPECT_FALSE(o.answered());
  EXPECT_EQ(o.failure, Failure::Network) << o.error;
  relay_->reset = false;
  EXPECT_TRUE(call(*client_, Method::Post, {"piggy"}, "y").answered());
}

TEST_F(CoapClientTest, Block1RetransmissionsExhaustedIsTimeout) {
  relay_->drop = true;
  ClientOptions opts;
  opts.request_timeout = 20s;
  opts.ack_timeout = 1s;
  opts.max_retransmit = 1;
  client_ = make_client(opts);
  const Outcome o = call(*client_, Method::Post, {"echo"}, std::string(3000, 'n'), 8s);
  EXPECT_EQ(o.failure, Failure::Timeout) << o.error;
}

// The same when a later block is lost: libcoap uses a new token per block, yet the failure must
// still reach the request's callback.
TEST_F(CoapClientTest, Block1LaterBlockLostIsTimeout) {
  relay_->forward_limit = 1;
  ClientOptions opts;
  opts.request_timeout = 20s;
  opts.ack_timeout = 1s;
  opts.max_retransmit = 1;
  client_ = make_client(opts);
  const Outcome o = call(*client_, Method::Post, {"echo"}, std::string(3000, 'n'), 8s);
  EXPECT_EQ(o.failure, Failure::Timeout) << o.error;
  EXPECT_EQ(relay_->where([](auto& d) { return !d.to_server && d.code == 231; }).size(), 1u);
}

TEST_F(CoapClientTest, LateResponseAfterTimeoutIsIgnored) {
  ClientOptions opts;
  opts.request_timeout = 30ms;  // "separate" answers after 100 ms
  client_ = make_client(opts);
  int calls = 0;
  Outcome out;
  client_->request(Method::Post, {"separate"}, "x", [&](const Outcome& o) {
    ++calls;
    out = o;
  });
  run_for(600ms);
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(out.failure, Failure::Timeout);
  EXPECT_EQ(server_->handled, 1);  // the answer did arrive, and was dropped
}

TEST_F(CoapClientTest, ServerDownThenBack) {
  // Talk straight to a port nobody listens on: the kernel answers with ICMP port unreachable.
  const uint16_t port = free_port();
  ClientOptions opts;
  opts.request_timeout = 3s;
  client_ = make_client(opts, port);
  const Outcome down = call(*client_, Method::Post, {"piggy"}, "x", 10s);
  EXPECT_FALSE(down.answered());
  // libcoap 4.3.1 turns the ICMP error into COAP_NACK_ICMP_ISSUE at once.
  EXPECT_EQ(down.failure, Failure::Network) << down.error;
  // The server comes up on that port; the same client recovers.
  Server late(loop_, port);
  ASSERT_TRUE(late.ok());
  const Outcome up = call(*client_, Method::Post, {"piggy"}, "x", 10s);
  ASSERT_TRUE(up.answered()) << up.error;
  EXPECT_EQ(up.response->code, 201);
  client_.reset();  // before `late` goes away
}

TEST_F(CoapClientTest, ARequestFailedByICMPIsNotRetransmittedAfterwards) {
  // The request failed (ICMP port unreachable); libcoap kept retransmitting its CON on the broken
  // session until the next request replaced it, so a returning server got requests the agent had
  // already counted as failed, on libcoap's schedule rather than the agent's backoff (found by the
  // fleet test: retransmissions #1-#3 of failed requests during a server outage).
  const uint16_t port = free_port();
  ClientOptions opts;
  opts.ack_timeout = 1s;
  client_ = make_client(opts, port);
  const Outcome down = call(*client_, Method::Post, {"piggy"}, "x", 10s);
  ASSERT_EQ(down.failure, Failure::Network) << down.error;
  const int listener = bind_udp(port);  // the server is back, on the same port
  ASSERT_GE(listener, 0);
  run_for(3500ms);  // retransmission #1 would come after 1-1.5 s, #2 after 2-3 s more
  unsigned char buf[1500];
  const ssize_t n = recv(listener, buf, sizeof buf, MSG_DONTWAIT);
  EXPECT_LT(n, 0) << "a failed request was still retransmitted (" << n << " bytes)";
  close(listener);
}

TEST_F(CoapClientTest, SmallPayloadIsOneDatagramWithoutBlock1) {
  client_ = make_client();
  const std::string body(1024, 'a');
  const Outcome o = call(*client_, Method::Post, {"echo"}, body);
  ASSERT_TRUE(o.answered()) << o.error;
  EXPECT_EQ(o.response->code, 204);
  EXPECT_EQ(server_->last_body, body);
  const auto req = relay_->where([](auto& d) { return d.to_server && d.type == kCon; });
  ASSERT_EQ(req.size(), 1u);
  EXPECT_FALSE(req[0].has(kOptBlock1));
  EXPECT_LE(req[0].size, 1100u);
}

void check_block1(const std::vector<Datagram>& log, std::size_t body_size,
                  std::size_t block = 1024) {
  const auto reqs = [&] {
    std::vector<Datagram> v;
    for (const auto& d : log)
      if (d.to_server && d.type == kCon && d.has(kOptBlock1)) v.push_back(d);
    return v;
  }();
  const std::size_t blocks = (body_size + block - 1) / block;
  const unsigned szx = static_cast<unsigned>(__builtin_ctzl(block)) - 4;
  ASSERT_EQ(reqs.size(), blocks);
  for (std::size_t i = 0; i < reqs.size(); ++i) {
    const unsigned b1 = reqs[i].uint_opt(kOptBlock1);
    EXPECT_EQ(b1 >> 4, i);                               // NUM
    EXPECT_EQ((b1 >> 3) & 1, i + 1 < blocks ? 1u : 0u);  // M
    EXPECT_EQ(b1 & 7, szx);                              // block = 2^(SZX+4) bytes
    EXPECT_LE(reqs[i].payload.size(), block);
  }
  for (const auto& d : log) EXPECT_LE(d.size, 1100u) << "datagram too big";
  // The server continued every non-final block with 2.31 (RFC 7959 §2.3).
  std::size_t continues = 0;
  for (const auto& d : log)
    if (!d.to_server && d.code == 231) ++continues;
  EXPECT_EQ(continues, blocks - 1);
}

TEST_F(CoapClientTest, Block1LargePayloadArrivesIntact) {
  client_ = make_client();
  std::string body;
  for (int i = 0; body.size() < 5000; ++i) body += static_cast<char>('A' + i % 26);
  body.resize(5000);
  const Outcome o = call(*client_, Method::Post, {"api", "v1", "SECRETTOKEN42", "echo"}, body);
  // The resource does not exist at that path: use the plain echo to check the body too.
  ASSERT_TRUE(o.answered()) << o.error;
  EXPECT_EQ(o.response->code, 404);

  relay_->log.clear();
  const Outcome e = call(*client_, Method::Post, {"echo"}, body);
  ASSERT_TRUE(e.answered()) << e.error;
  EXPECT_EQ(e.response->code, 204);  // the final answer, not a 2.31
  EXPECT_EQ(server_->last_body, body);
  // The echo comes back with Block2 and is reassembled into one body.
  EXPECT_EQ(e.response->payload, body);
  EXPECT_EQ(e.response->content_format, 42);
  check_block1(relay_->log, body.size());
  EXPECT_FALSE(relay_->where([](auto& d) { return !d.to_server && d.has(kOptBlock2); }).empty());
}

// ThingsBoard's case for telemetry over 1024 bytes: 2.31 Continue for every block but the last
// (piggybacked by Californium), then the final 2.01 as a separate CON without any ACK (§8).
TEST_F(CoapClientTest, Block1WithFinalConResponseWithoutAck) {
  ClientOptions opts;
  opts.ack_timeout = 1s;
  client_ = make_client(opts);
  const std::string body(3500, 'k');
  const Outcome o = call(*client_, Method::Post, {"con_noack"}, body);
  ASSERT_TRUE(o.answered()) << o.error;
  EXPECT_EQ(o.response->code, 201);
  EXPECT_EQ(server_->last_body, body);
  run_for(2000ms);  // past the retransmission window: nothing more is sent
  check_block1(relay_->log, body.size());
  const auto final_answer =
      relay_->where([](auto& d) { return !d.to_server && d.type == kCon && d.code == 201; });
  ASSERT_EQ(final_answer.size(), 1u);
  const int smid = final_answer[0].mid;
  EXPECT_EQ(
      relay_->where([&](auto& d) { return d.to_server && d.type == kAck && d.mid == smid; }).size(),
      1u);
  EXPECT_EQ(server_->handled, 1);
  EXPECT_EQ(client_->in_flight(), 0u);
}

// An error answer to a later block (4.08 Request Entity Incomplete, §1) ends the request with that
// answer, although libcoap sent that block with a token of its own.
TEST_F(CoapClientTest, Block1ErrorOnLaterBlockIsTheAnswer) {
  relay_->answer_nth = 2;
  relay_->answer_code = 408;
  ClientOptions opts;
  opts.request_timeout = 5s;
  client_ = make_client(opts);
  const Outcome o = call(*client_, Method::Post, {"echo"}, std::string(3000, 'e'), 3s);
  ASSERT_TRUE(o.answered()) << o.error;
  EXPECT_EQ(o.response->code, 408);
}

TEST_F(CoapClientTest, Block1JustOverOneBlock) {
  client_ = make_client();
  const std::string body(1025, 'z');
  const Outcome e = call(*client_, Method::Post, {"echo"}, body);
  ASSERT_TRUE(e.answered()) << e.error;
  EXPECT_EQ(server_->last_body, body);
  check_block1(relay_->log, body.size());
}

TEST_F(CoapClientTest, Block1ShrinksBlocksForLongPaths) {
  client_ = make_client();
  const std::string body(3000, 'w');
  const Outcome e = call(*client_, Method::Post, {"echo", long_segment()}, body);
  ASSERT_TRUE(e.answered()) << e.error;
  EXPECT_EQ(e.response->code, 204);
  EXPECT_EQ(server_->last_body, body);
  check_block1(relay_->log, body.size(), 512);
}

TEST_F(CoapClientTest, Block2LargeResponseIsReassembled) {
  client_ = make_client();
  const Outcome o = call(*client_, Method::Get, {"big"});
  ASSERT_TRUE(o.answered()) << o.error;
  EXPECT_EQ(o.response->code, 205);
  EXPECT_GE(o.response->payload.size(), 6000u);
  EXPECT_EQ(o.response->payload.substr(0, 8), "0,1,2,3,");
}

TEST_F(CoapClientTest, ManyConcurrentRequests) {
  client_ = make_client();
  constexpr int kN = 60;
  std::vector<int> calls(kN, 0);
  std::vector<int> codes(kN, 0);
  const std::vector<std::string> paths = {"piggy", "separate", "con_noack", "e400"};
  const std::vector<int> expect = {201, 201, 201, 400};
  for (int i = 0; i < kN; ++i) {
    client_->request(Method::Post, {paths[i % 4]}, std::to_string(i), [&, i](const Outcome& o) {
      ++calls[i];
      codes[i] = o.answered() ? o.response->code : -1;
    });
  }
  EXPECT_EQ(client_->in_flight(), static_cast<std::size_t>(kN));
  ASSERT_TRUE(run_until([&] { return client_->in_flight() == 0; }, 10s));
  run_for(100ms);
  for (int i = 0; i < kN; ++i) {
    EXPECT_EQ(calls[i], 1) << i;
    EXPECT_EQ(codes[i], expect[i % 4]) << i;
  }
}

// Several exchanges in flight, one per clone (daemon::Uploader's lanes), answered the way
// ThingsBoard answers success (a CON without an ACK first, §8): no CON is ever sent twice. With
// NSTART raised on one session, libcoap 4.3.1 retransmitted some at once (docs/coap.md).
TEST_F(CoapClientTest, ClonesCarryExchangesInParallelWithoutSpuriousRetransmissions) {
  // Straight to the server: the relay answers only the last client it heard from.
  client_ = make_client({}, server_port_);
  std::vector<std::unique_ptr<Client>> lanes;
  std::string error;
  for (int i = 0; i < 7; ++i) {
    lanes.push_back(client_->clone(&error));
    ASSERT_TRUE(lanes.back()) << error;
  }
  lanes.push_back(std::move(client_));
  int calls = 0, created = 0, sent = 0;
  std::function<void(Client&)> next = [&](Client& lane) {
    if (sent >= 200) return;
    ++sent;
    lane.request(Method::Post, {"con_noack"}, std::to_string(sent), [&](const Outcome& o) {
      ++calls;
      if (o.answered() && o.response->code == 201) ++created;
      next(lane);
    });
  };
  for (auto& lane : lanes) next(*lane);
  std::size_t most = 0;
  ASSERT_TRUE(run_until(
      [&] {
        std::size_t now = 0;
        for (auto& lane : lanes) now += lane->in_flight();
        most = std::max(most, now);
        return calls == 200;
      },
      20s));
  EXPECT_EQ(created, 200);
  EXPECT_EQ(most, 8u);
  // libcoap's server does not deduplicate (docs/test-server.md): one call per CON received.
  EXPECT_EQ(server_->handled, 200) << "a CON went out more than once";
  lanes.clear();
}

TEST_F(CoapClientTest, ElapsedIsMeasured) {
  client_ = make_client();
  const Outcome o = call(*client_, Method::Post, {"piggy"}, "x");
  ASSERT_TRUE(o.answered());
  EXPECT_GE(o.elapsed.count(), 0);
  EXPECT_LT(o.elapsed, 2s);
}

TEST_F(CoapClientTest, CancelDeliversCanceledFromTheLoop) {
  relay_->drop = true;
  client_ = make_client();
  int a = 0, b = 0, c = 0;
  Failure fa = Failure::None, fb = Failure::None;
  const RequestId ida = client_->request(Method::Post, {"piggy"}, "x",
                                         [&](const Outcome& o) { ++a, fa = o.failure; });
  client_->request(Method::Post, {"piggy"}, "y", [&](const Outcome& o) { ++b, fb = o.failure; });
  client_->request(Method::Post, {"piggy"}, "z", [&](const Outcome&) { ++c; });
  client_->cancel(ida);
  EXPECT_EQ(a, 0);  // not synchronously
  EXPECT_EQ(client_->in_flight(), 2u);
  client_->cancel(ida);  // twice: ignored
  client_->cancel(12345);
  client_->cancel_all();
  EXPECT_EQ(client_->in_flight(), 0u);
  run_for(100ms);
  EXPECT_EQ(a, 1);
  EXPECT_EQ(b, 1);
  EXPECT_EQ(c, 1);
  EXPECT_EQ(fa, Failure::Canceled);
  EXPECT_EQ(fb, Failure::Canceled);
}

TEST_F(CoapClientTest, RequestAfterCancelIsNotStuckBehindIt) {
  relay_->drop = true;
  client_ = make_client();
  int calls = 0;
  client_->request(Method::Post, {"piggy"}, "a", [&](const Outcome&) { ++calls; });
  client_->request(Method::Post, {"echo"}, std::string(3000, 'b'),
                   [&](const Outcome&) { ++calls; });
  run_for(50ms);
  client_->cancel_all();
  ASSERT_TRUE(run_until([&] { return calls == 2; }));
  relay_->drop = false;
  const auto t0 = std::chrono::steady_clock::now();
  const Outcome o = call(*client_, Method::Post, {"piggy"}, "c");
  ASSERT_TRUE(o.answered()) << o.error;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 250ms);
}

// No busy polling: once the exchange is over, the loop sleeps.
TEST_F(CoapClientTest, IdleLoopDoesNotSpin) {
  client_ = make_client();
  ASSERT_TRUE(call(*client_, Method::Post, {"piggy"}, "x").answered());
  int wakeups = 0;
  const auto end = std::chrono::steady_clock::now() + 1s;
  while (std::chrono::steady_clock::now() < end) {
    if (sd_event_run(loop_, 100'000) > 0) ++wakeups;
  }
  EXPECT_LT(wakeups, 10);
}

TEST_F(CoapClientTest, DestroyWithRequestsInFlightCallsNothing) {
  relay_->drop = true;
  client_ = make_client();
  int calls = 0;
  client_->request(Method::Post, {"piggy"}, "x", [&](const Outcome&) { ++calls; });
  client_->request(Method::Post, {"echo"}, std::string(4000, 'q'),
                   [&](const Outcome&) { ++calls; });
  run_for(50ms);
  client_.reset();
  run_for(100ms);
  EXPECT_EQ(calls, 0);
}

TEST_F(CoapClientTest, CallbackMayDestroyTheClient) {
  client_ = make_client();
  int calls = 0;
  for (int i = 0; i < 3; ++i) {
    client_->request(Method::Post, {"piggy"}, "x", [&](const Outcome&) {
      ++calls;
      client_.reset();
    });
  }
  run_for(300ms);
  EXPECT_EQ(calls, 1);  // the others were dropped with the client
}

TEST_F(CoapClientTest, CallbackMaySendTheNextRequest) {
  client_ = make_client();
  int done = 0;
  std::function<void(const Outcome&)> next = [&](const Outcome& o) {
    EXPECT_TRUE(o.answered());
    if (++done < 5) client_->request(Method::Post, {"con_noack"}, "x", next);
  };
  client_->request(Method::Post, {"con_noack"}, "x", next);
  ASSERT_TRUE(run_until([&] { return done == 5; }));
}

TEST_F(CoapClientTest, ThrowingCallbackDoesNotEscape) {
  client_ = make_client();
  int calls = 0;
  client_->request(Method::Post, {"piggy"}, "x", [&](const Outcome&) {
    ++calls;
    throw std::runtime_error("boom");
  });
  ASSERT_TRUE(run_until([&] { return calls == 1; }));
  EXPECT_TRUE(call(*client_, Method::Post, {"piggy"}, "x").answered());
}

// ---- hostile answers (issue 8) ----

class CoapHostileTest : public CoapClientTest {
 protected:
  // Runs one request against `script` with a long request_timeout, so only the client's own
  // limits can end it quickly.
  Outcome hostile_call(HostileServer::Script script, std::string payload = "{}",
                       ClientOptions opts = {}) {
    hostile_ = std::make_unique<HostileServer>(loop_, std::move(script));
    opts.request_timeout = 60s;
    client_ = make_client(opts, hostile_->port());
    return call(*client_, Method::Post, {"api", "v1", "TOKEN", "telemetry"}, std::move(payload),
                20s);
  }
  // Requests keep coming only while libcoap still drives the exchange.
  std::size_t requests_after_quiet_period() {
    const std::size_t before = hostile_->requests.size();
    run_for(1500ms);
    EXPECT_EQ(hostile_->requests.size(), before) << "libcoap still asks for blocks";
    return hostile_->requests.size();
  }
  void TearDown() override {
    client_.reset();
    hostile_.reset();
    CoapClientTest::TearDown();
  }
  std::unique_ptr<HostileServer> hostile_;
};

TEST_F(CoapHostileTest, EndlessBlock2IsCappedAndStopped) {
  const auto t0 = std::chrono::steady_clock::now();
  const Outcome o = hostile_call([](const Datagram& d) { return endless_block2(d); });
  EXPECT_FALSE(o.answered());
  EXPECT_EQ(o.failure, Failure::Protocol) << o.error;
  EXPECT_NE(o.error.find("exceeds 16.0 KiB (Block2)"), std::string::npos) << o.error;
  EXPECT_NE(describe(o).find("protocol error"), std::string::npos) << describe(o);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 10s);
  // 16 full blocks fit; the 17th is over the cap, and libcoap asked for an 18th before we saw it.
  const std::size_t n = requests_after_quiet_period();
  EXPECT_GE(n, 17u);
  EXPECT_LE(n, 18u);
  EXPECT_EQ(client_->in_flight(), 0u);
}

TEST_F(CoapHostileTest, MaxResponseBodyIsConfigurable) {
  ClientOptions opts;
  opts.max_response_body = 4096;
  const Outcome o = hostile_call([](const Datagram& d) { return endless_block2(d); }, "{}", opts);
  EXPECT_EQ(o.failure, Failure::Protocol) << o.error;
  EXPECT_NE(o.error.find("exceeds 4.0 KiB"), std::string::npos) << o.error;
  EXPECT_LE(requests_after_quiet_period(), 6u);
}

TEST_F(CoapHostileTest, HugeSize2IsRefusedAtOnce) {
  const Outcome o = hostile_call([](const Datagram& d) { return endless_block2(d, 0xFFFFFFFFu); });
  EXPECT_EQ(o.failure, Failure::Protocol) << o.error;
  EXPECT_NE(o.error.find("Size2"), std::string::npos) << o.error;
  // The request and at most the one block request libcoap sent before handing us block 0.
  EXPECT_LE(requests_after_quiet_period(), 2u);
}

TEST_F(CoapHostileTest, Block2OutOfOrderIsAProtocolError) {
  const Outcome o = hostile_call([](const Datagram& d) {
    Answer a = endless_block2(d);
    a.options[0].second = uint_value((5u << 4) | 0x8 | 6);  // always block 5
    return a;
  });
  EXPECT_EQ(o.failure, Failure::Protocol) << o.error;
  EXPECT_LE(requests_after_quiet_period(), 2u);
}

// After a session was dropped for a hostile answer, the client goes on with a fresh one.
TEST_F(CoapHostileTest, NextRequestAfterAnAbandonedBlock2Works) {
  bool hostile = true;
  const Outcome o = hostile_call([&](const Datagram& d) -> std::optional<Answer> {
    if (hostile) return endless_block2(d);
    return Answer{};
  });
  EXPECT_EQ(o.failure, Failure::Protocol) << o.error;
  hostile = false;
  const Outcome next = call(*client_, Method::Post, {"api", "v1", "TOKEN", "telemetry"}, "{}");
  ASSERT_TRUE(next.answered()) << next.error;
  EXPECT_EQ(next.response->code, 201);
}

TEST_F(CoapHostileTest, Block2WithinTheCapIsReassembled) {
  const Outcome o = hostile_call([](const Datagram& d) {
    Answer a = endless_block2(d);
    const unsigned num = d.has(kOptBlock2) ? d.uint_opt(kOptBlock2) >> 4 : 0;
    a.payload.assign(1024, static_cast<char>('a' + num));
    if (num == 2) {
      a.options[0].second = uint_value((num << 4) | 6);  // M=0: the last block
      a.payload = "end";
    }
    return a;
  });
  ASSERT_TRUE(o.answered()) << o.error;
  EXPECT_EQ(o.response->code, 201);
  EXPECT_EQ(o.response->payload, std::string(1024, 'a') + std::string(1024, 'b') + "end");
}

// A 2.31 Continue that ends a Block1 transfer is no answer (issue 8, item 3). The scripts answer
// block `bad_block` with the hostile 2.31 and every other block with a proper 2.31.
struct ContinueCase {
  const char* name;
  unsigned bad_block;
  std::function<std::optional<std::string>(unsigned num)> block1;  // nullopt: no Block1 option
};

Answer continue_answer(const Datagram& d, const ContinueCase& c) {
  const unsigned b1 = d.uint_opt(kOptBlock1);
  const unsigned num = b1 >> 4;
  Answer a;
  a.code = 231;
  if (num != c.bad_block) {
    a.options.emplace_back(kOptBlock1, uint_value(b1 | 0x8));
    return a;
  }
  if (auto v = c.block1(num)) a.options.emplace_back(kOptBlock1, *v);
  return a;
}

TEST_F(CoapHostileTest, FinalContinueIsNeverAnAnswer) {
  const std::vector<ContinueCase> cases = {
      {"no Block1", 0, [](unsigned) { return std::nullopt; }},
      {"on the last block", 2, [](unsigned n) { return uint_value((n << 4) | 6); }},
      {"wild block number", 0, [](unsigned) { return uint_value((1000u << 4) | 0x8 | 6); }},
      {"SZX 7", 0, [](unsigned n) { return uint_value((n << 4) | 0x8 | 7); }},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const Outcome o = hostile_call([&](const Datagram& d) { return continue_answer(d, c); },
                                   std::string(3000, 'r'));
    EXPECT_FALSE(o.answered()) << "2.31 reported as the answer";
    EXPECT_EQ(o.failure, Failure::Protocol) << o.error;
    EXPECT_NE(o.error.find("2.31"), std::string::npos) << o.error;
    EXPECT_EQ(hostile_->requests.size(), c.bad_block + 1);
    client_.reset();
  }
}

TEST_F(CoapHostileTest, ContinueToAPlainRequestIsNeverAnAnswer) {
  const Outcome o = hostile_call([](const Datagram&) { return Answer{231, {}, {}}; });
  EXPECT_FALSE(o.answered());
  EXPECT_EQ(o.failure, Failure::Protocol) << o.error;
}

TEST(CoapClientCreate, AnyHostAndBadOptions) {
  sd_event* loop = nullptr;
  ASSERT_GE(sd_event_new(&loop), 0);
  std::string error;
  // Names are resolved on the loop before the first request, never in create() (CoapClientDns).
  EXPECT_TRUE(Client::create(loop, Endpoint{"no-such-host.invalid", 5683}, {}, &error)) << error;
  ClientOptions bad;
  bad.block_size = 1000;
  EXPECT_FALSE(Client::create(loop, Endpoint{"127.0.0.1", 5683}, bad, &error));
  ClientOptions fast_ack;
  fast_ack.ack_timeout = 500ms;
  EXPECT_FALSE(Client::create(loop, Endpoint{"127.0.0.1", 5683}, fast_ack, &error));
  ClientOptions no_retry;
  no_retry.max_retransmit = 0;
  EXPECT_FALSE(Client::create(loop, Endpoint{"127.0.0.1", 5683}, no_retry, &error));
  ClientOptions tiny_answers;
  tiny_answers.max_response_body = 1023;
  EXPECT_FALSE(Client::create(loop, Endpoint{"127.0.0.1", 5683}, tiny_answers, &error));
  EXPECT_TRUE(Client::create(loop, Endpoint{"::1", 5683}, {}, &error)) << error;
  auto ok = Client::create(loop, Endpoint{"localhost", 5683}, {}, &error);
  EXPECT_TRUE(ok) << error;
  if (ok) {
    EXPECT_EQ(ok->endpoint().host, "localhost");
  }
  ok.reset();
  sd_event_unref(loop);
}

// ---- names: resolved on the loop (issue 8, items 4 and 5) ----

class CoapClientDns : public CoapClientTest {
 protected:
  void SetUp() override {
    // As in the agent: the resolver's child is watched with sd_event_add_child.
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    ASSERT_EQ(sigprocmask(SIG_BLOCK, &mask, nullptr), 0);
    std::string why;
    if (!dns_.setup(&why)) GTEST_SKIP() << why;
    CoapClientTest::SetUp();
  }
  std::unique_ptr<Client> make_named(const std::string& host, ClientOptions opts = {}) {
    std::string error;
    auto c = Client::create(loop_, Endpoint{host, relay_->port()}, opts, &error);
    EXPECT_TRUE(c) << error;
    return c;
  }
  tb::testing::PrivateDns dns_;
};

TEST_F(CoapClientDns, CreateNeverBlocksAndARequestWaitsForTheNameWithinItsTimeout) {
  ClientOptions opts;
  opts.request_timeout = 1500ms;
  const auto t0 = std::chrono::steady_clock::now();
  client_ = make_named("tb.example.com", opts);  // the DNS server never answers
  ASSERT_TRUE(client_);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 1s) << "create() must not resolve";
  const Outcome o = call(*client_, Method::Post, {"piggy"}, "x", 10s);
  const auto took = std::chrono::steady_clock::now() - t0;
  EXPECT_FALSE(o.answered());
  // The lookup gives up first (90 % of request_timeout) and says why.
  EXPECT_EQ(o.failure, Failure::Network);
  EXPECT_EQ(o.error, "cannot resolve tb.example.com: no answer within 1s350ms");
  EXPECT_GE(took, 1300ms);
  EXPECT_LT(took, 8s) << "bounded by request_timeout, not by the resolver's 30 s";
  EXPECT_EQ(relay_->where([](auto&) { return true; }).size(), 0u);
}

TEST_F(CoapClientDns, AnUnresolvableNameFailsTheRequestAsNetwork) {
  dns_.refuse();
  client_ = make_named("name.invalid");
  ASSERT_TRUE(client_);
  const Outcome o = call(*client_, Method::Post, {"piggy"}, "x", 10s);
  EXPECT_FALSE(o.answered());
  EXPECT_EQ(o.failure, Failure::Network);
  EXPECT_EQ(o.error.rfind("cannot resolve name.invalid: ", 0), 0u) << o.error;
  EXPECT_NE(describe(o).find("cannot resolve name.invalid"), std::string::npos);
}

TEST_F(CoapClientDns, RequestsMadeWhileResolvingAreSentOnceTheAnswerArrives) {
  dns_.set_hosts("127.0.0.1 tb.test\n");
  client_ = make_named("tb.test");
  ASSERT_TRUE(client_);
  std::vector<int> calls(3, 0);
  std::vector<Outcome> outs(3);
  for (int i = 0; i < 3; ++i) {
    client_->request(Method::Post, {"piggy"}, "x", [&, i](const Outcome& o) {
      ++calls[i];
      outs[i] = o;
    });
  }
  EXPECT_EQ(client_->in_flight(), 3u);
  ASSERT_TRUE(run_until([&] { return calls[0] && calls[1] && calls[2]; }, 10s));
  run_for(50ms);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(calls[i], 1);
    ASSERT_TRUE(outs[i].answered()) << outs[i].error;
    EXPECT_EQ(outs[i].response->code, 201);
  }
}

TEST_F(CoapClientDns, TheNameIsResolvedAgainAfterANetworkFailure) {
  // The name first points where nobody listens (ICMP port unreachable), then moves.
  dns_.set_hosts("127.0.0.3 tb.test\n");
  client_ = make_named("tb.test");
  ASSERT_TRUE(client_);
  const Outcome down = call(*client_, Method::Post, {"piggy"}, "x", 10s);
  EXPECT_EQ(down.failure, Failure::Network) << down.error;
  dns_.set_hosts("127.0.0.1 tb.test\n");
  const Outcome up = call(*client_, Method::Post, {"piggy"}, "x", 10s);
  ASSERT_TRUE(up.answered()) << up.error;
  EXPECT_EQ(up.response->code, 201);
}

TEST_F(CoapClientDns, ARefreshFollowsAChangedAnswerWhileTheOldAddressStillAnswers) {
  // A reload: the operator changed the name's answer; the old address still works.
  dns_.set_hosts("127.0.0.1 tb.test\n");
  client_ = make_named("tb.test");
  ASSERT_TRUE(client_);
  const Outcome first = call(*client_, Method::Post, {"piggy"}, "x", 10s);
  ASSERT_TRUE(first.answered()) << first.error;
  dns_.set_hosts("127.0.0.3 tb.test\n");  // nobody listens there: ICMP port unreachable
  const Outcome same = call(*client_, Method::Post, {"piggy"}, "x", 10s);
  ASSERT_TRUE(same.answered()) << "a working session is kept without a refresh: " << same.error;
  client_->refresh_address();
  const Outcome moved = call(*client_, Method::Post, {"piggy"}, "x", 10s);
  EXPECT_FALSE(moved.answered()) << "still on the old address after refresh_address()";
  EXPECT_EQ(moved.failure, Failure::Network) << moved.error;
}

TEST_F(CoapClientDns, ARefreshWithTheSameOrNoAnswerKeepsTheSession) {
  dns_.set_hosts("127.0.0.1 tb.test\n");
  client_ = make_named("tb.test");
  ASSERT_TRUE(client_);
  ASSERT_TRUE(call(*client_, Method::Post, {"piggy"}, "x", 10s).answered());
  client_->refresh_address();
  const Outcome same = call(*client_, Method::Post, {"piggy"}, "x", 10s);
  ASSERT_TRUE(same.answered()) << same.error;
  EXPECT_EQ(same.response->code, 201);
  // The name stops resolving (no hosts entry, no DNS): the address in use still works.
  dns_.set_hosts("");
  dns_.refuse();
  client_->refresh_address();
  const Outcome kept = call(*client_, Method::Post, {"piggy"}, "x", 10s);
  ASSERT_TRUE(kept.answered()) << kept.error;
  EXPECT_EQ(kept.response->code, 201);
}

TEST_F(CoapClientDns, DestroyingTheClientWhileResolvingCallsNothing) {
  client_ = make_named("tb.example.com");
  ASSERT_TRUE(client_);
  int calls = 0;
  client_->request(Method::Post, {"piggy"}, "x", [&](const Outcome&) { ++calls; });
  run_for(200ms);
  client_.reset();
  run_for(200ms);
  EXPECT_EQ(calls, 0);
}

TEST_F(CoapClientTest, AccessTokenNeverReachesTheLog) {
  std::ostringstream captured;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(captured);
  auto logger = std::make_shared<spdlog::logger>("capture", sink);
  auto previous = spdlog::default_logger();
  spdlog::set_default_logger(logger);
  spdlog::set_level(spdlog::level::debug);
  client_ = make_client();  // picks up the debug level for libcoap too
  const Outcome o = call(*client_, Method::Post, {"api", "v1", "SECRETTOKEN42", "telemetry"}, "{}");
  EXPECT_TRUE(o.answered());
  client_.reset();
  spdlog::set_default_logger(previous);
  spdlog::set_level(spdlog::level::info);
  coap_set_log_level(LOG_WARNING);
  const std::string text = captured.str();
  EXPECT_NE(text.find("libcoap"), std::string::npos) << "libcoap logs are not routed to spdlog";
  EXPECT_NE(text.find("<token>"), std::string::npos);
  EXPECT_EQ(text.find("SECRETTOKEN42"), std::string::npos) << text;
}

}  // namespace
}  // namespace tb::coap
