// tb-test-server: a ThingsBoard-compatible CoAP server for tests and the README demo.
// Every behaviour emulated here cites the section of docs/thingsboard-coap.md
// ("§N") it comes from. See docs/test-server.md for the CLI, the control protocol and the
// record format.
//
// Why the message layer is ours and not libcoap's session layer (probed against libcoap 4.3.1,
// see docs/test-server.md "Why not libcoap's server"):
//  - libcoap does not deduplicate requests: a CON with a repeated MID calls the handler again,
//    so Californium's (peer, MID) deduplication (§6.6) has to be ours anyway;
//  - libcoap answers a request datagram above its receive PDU size (~1.1 KB) with RST, where TB
//    accepts up to 2048 bytes and drops bigger datagrams silently (§1);
//  - libcoap *can* send a CON response with a new MID and no empty ACK (set type CON and a new
//    MID in the handler) and can stay silent (type NON, code 0), but the replay of answers to
//    duplicates, lost replies and per-datagram records are simpler with the socket in hand.
// So the socket, the exchange table and the retransmission of CON responses live here, and
// libcoap decodes every datagram (coap_pdu_parse): what counts as well-formed is what a real
// CoAP stack says.
//
// Single-threaded: one poll() loop over the UDP socket and stdin, plus a timer list.
#include <arpa/inet.h>
#include <coap3/coap.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "faults.h"
#include "observe.h"
#include "tb_rules.h"
#include "wire.h"
#include "x509.h"

namespace tbserver {
namespace {

using ordered_json = nlohmann::ordered_json;

// ---- constants taken from the doc -------------------------------------------------------------
constexpr size_t kUdpDatagramSize = 2048;     // §1: Californium UDP_DATAGRAM_SIZE, bigger dropped
constexpr size_t kPreferredBlock = 1024;      // §1: MAX_MESSAGE_SIZE / PREFERRED_BLOCK_SIZE
constexpr uint64_t kMaxBody = 256ull << 20;   // §1: MAX_RESOURCE_BODY_SIZE
constexpr int64_t kBlockLifetimeMs = 300000;  // §1/§6.4: BLOCKWISE_STATUS_LIFETIME
constexpr int64_t kConLifetimeMs = 247000;    // §6.6: EXCHANGE_LIFETIME (dedup window, CON)
constexpr int64_t kNonLifetimeMs = 145000;    // §6.6: NON_LIFETIME (dedup window, NON)
constexpr int64_t kPiggybackTimeoutMs = 500;  // §6.4: transport.coap.piggyback_timeout
constexpr int64_t kAckTimeoutMs = 2000;       // §6.4: ACK_TIMEOUT 2 s, random factor 1.5
constexpr int kMaxRetransmit = 4;             // §1/§6.4: MAX_RETRANSMIT

constexpr uint8_t kCreated = Code(2, 1);
constexpr uint8_t kValid = Code(2, 3);
constexpr uint8_t kContent = Code(2, 5);
constexpr uint8_t kContinue = Code(2, 31);
constexpr uint8_t kBadRequest = Code(4, 0);
constexpr uint8_t kUnauthorized = Code(4, 1);
constexpr uint8_t kBadOption = Code(4, 2);
constexpr uint8_t kNotFound = Code(4, 4);
constexpr uint8_t kMethodNotAllowed = Code(4, 5);
constexpr uint8_t kIncomplete = Code(4, 8);
constexpr uint8_t kTooLarge = Code(4, 13);

int64_t SteadyMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
int64_t WallMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string Hex(const std::string& s) {
  static const char* d = "0123456789abcdef";
  std::string o;
  for (unsigned char c : s) {
    o.push_back(d[c >> 4]);
    o.push_back(d[c & 15]);
  }
  return o;
}

// ---- options ----------------------------------------------------------------------------------
enum class Framing { kPiggyback, kSeparate, kConNoAck };
const char* FramingName(Framing f) {
  switch (f) {
    case Framing::kPiggyback:
      return "piggyback";
    case Framing::kSeparate:
      return "separate";
    case Framing::kConNoAck:
      return "con-no-ack";
  }
  return "?";
}
// Hostile answers (not ThingsBoard behaviour; for the agent's defences, see docs/test-server.md
// "Hostile answers").
enum class Block2Mode { kOff, kEndless, kHugeSize2 };
enum class ContinueMode { kOff, kNoBlock1, kLastBlock, kWildNum, kSzx7 };
const std::map<std::string, Block2Mode> kBlock2Modes = {{"off", Block2Mode::kOff},
                                                        {"endless", Block2Mode::kEndless},
                                                        {"huge-size2", Block2Mode::kHugeSize2}};
const std::map<std::string, ContinueMode> kContinueModes = {
    {"off", ContinueMode::kOff},
    {"no-block1", ContinueMode::kNoBlock1},
    {"last-block", ContinueMode::kLastBlock},
    {"wild-num", ContinueMode::kWildNum},
    {"szx7", ContinueMode::kSzx7}};
template <class M>
std::string ModeName(const std::map<std::string, M>& modes, M m) {
  for (const auto& [name, v] : modes)
    if (v == m) return name;
  return "?";
}

std::optional<Framing> ParseFraming(const std::string& s) {
  if (s == "piggyback") return Framing::kPiggyback;
  if (s == "separate") return Framing::kSeparate;
  if (s == "con-no-ack") return Framing::kConNoAck;
  return std::nullopt;
}

struct Options {
  int port = 5683;  // §6.1
  std::string bind = "127.0.0.1";
  std::string state_file;
  std::string record_file;
  std::string provision_key;
  std::string provision_secret;
  bool pre_provisioned = false;
  std::vector<std::pair<std::string, std::string>> devices;
  std::vector<std::pair<std::string, std::string>> x509_devices;  // NAME, PEM file
  bool strict_size = false;
  int verbosity = 1;                     // 0 quiet, 1 normal, 2 verbose
  Framing framing = Framing::kConNoAck;  // §8: what TB does today
};

// ---- peer / request / reply -------------------------------------------------------------------
struct Peer {
  sockaddr_storage addr{};
  socklen_t len = 0;
  std::string key;  // "ip:port"
};

struct Request {
  Peer peer;
  Message msg;
  bool con = false;
  std::vector<std::string> path;
  std::vector<std::string> query;
  std::string payload;  // assembled body for Block1 transfers
  std::optional<Block> block1_final;
  size_t datagram_bytes = 0;
};

struct Reply {
  uint8_t code = 0;
  std::string payload;
  std::optional<uint32_t> content_format;
  std::optional<uint32_t> observe;
  bool success = false;  // §8: 2.0x of telemetry/attributes/claim/rpc -> separate CON framing
  bool none = false;     // no response at all (only the empty ACK after the piggyback timeout)
  bool lost = false;     // lose-provision-reply: processed, nothing sent
  // Hostile switches: a Block1 value other than the usual echo, or none at all; Block2 and Size2.
  std::optional<uint32_t> block1;
  bool no_block1 = false;
  std::optional<uint32_t> block2;
  std::optional<uint32_t> size2;
  FaultMode fault = FaultMode::kOff;  // control "fault" (faults.h)
};

struct Exchange {
  int64_t created = 0;
  bool con = false;
  bool answered = false;
  bool lost = false;
  bool empty_acked = false;
  std::string piggy;  // bytes of the piggybacked ACK, resent to duplicates (§6.6)
  std::optional<uint16_t> con_mid;
};

struct OutCon {
  Peer peer;
  std::string bytes;
  int64_t next = 0;
  int64_t timeout = 0;
  int retries = 0;
  std::string what;
};

struct BlockState {
  std::string body;
  uint8_t szx = 0;
  uint32_t next_num = 0;
  std::optional<uint32_t> cf;
  int64_t touched = 0;
};

struct Device {
  std::string token;
  // X509_CERTIFICATE credential (§4.1 "hash", §6.2): the PEM as given, and its leaf's DER, by
  // which a DTLS client certificate is matched. Empty when the device has none.
  std::string x509_pem;
  std::string x509_der;
  bool provisioned = false;
  json client = json::object();
  json shared = json::object();
};

volatile std::sig_atomic_t g_stop = 0;
void OnSignal(int) { g_stop = 1; }

class Server {
 public:
  explicit Server(Options o) : opt_(std::move(o)), rng_(std::random_device{}()) {
    mid_ = static_cast<uint16_t>(rng_() & 0xffff);
  }

  bool Init();
  int Run();

 private:
  // datagram path
  void OnReadable();
  void OnDatagram(const uint8_t* d, size_t n, const Peer& peer);
  void OnDuplicate(Exchange& ex, const Request& rq);
  void Process(Request& rq, const std::string& exkey, ordered_json& rec);
  std::optional<Reply> HandleBlock1(Request& rq, ordered_json& rec);
  std::optional<Reply> HostileContinue(const Block& b, ordered_json& rec);
  Reply EndlessBlock(uint32_t num, uint8_t szx, ordered_json& rec);
  Reply Dispatch(const Request& rq, ordered_json& rec);
  Reply DispatchApi(const Request& rq, ordered_json& rec);
  Reply Provision(const Request& rq, ordered_json& rec);
  Reply PostTelemetry(const std::string& dev, const Request& rq, ordered_json& rec);
  Reply PostAttributes(const std::string& dev, const Request& rq, ordered_json& rec);
  Reply GetAttributes(const std::string& dev, const Request& rq);
  Reply Observe(const std::string& dev, Feature f, const Request& rq, ordered_json& rec);
  const std::string* DeviceByToken(const std::optional<std::string>& token);
  // X.509 identities (x509.h): the identity datagram from tb-test-dtls-proxy, the device a
  // peer's cached identity stands for, and the X509_CERTIFICATE credential of a device.
  void OnIdentity(std::string_view pem, const Peer& peer);
  const std::string* DeviceByIdentity(const Peer& peer) const;
  bool SetCertificate(const std::string& name, const std::string& pem, const std::string& der);
  void DropCertificate(const std::string& name);
  std::optional<Reply> FailSwitch();

  // framing
  void Deliver(const Request& rq, Reply rp, const std::string& exkey, ordered_json& rec);
  void Final(const Request& rq, const Reply& rp, const std::string& exkey);
  Message BaseResponse(const Request& rq, const Reply& rp);
  void SendEmptyAck(const Peer& p, uint16_t mid);
  void SendRst(const Peer& p, uint16_t mid);
  uint16_t SendCon(const Peer& p, Message m, const std::string& what);
  void SendRaw(const Peer& p, const std::string& bytes);
  void OnAckOrRst(const Message& m, const Peer& peer);
  void Timers();
  int64_t NextTimer();
  void After(int64_t ms, std::function<void()> fn) {
    tasks_.push_back({SteadyMs() + ms, std::move(fn)});
  }

  // control, state, record
  void OnStdin();
  std::string Control(const std::string& line);
  void LoadState();
  void SaveState();
  void Record(const ordered_json& rec);
  void Log(const std::string& line, int level = 1) {
    if (opt_.verbosity >= level) std::cerr << line << std::endl;
  }
  void Count(const std::string& k, int64_t n = 1) { stats_[k] += n; }

  Options opt_;
  std::mt19937 rng_;
  uint16_t mid_;
  int fd_ = -1;
  std::ofstream record_;
  std::string stdin_buf_;
  bool stdin_open_ = true;
  bool quit_ = false;

  std::map<std::string, Device> devices_;
  std::map<std::string, std::string> tokens_;  // token -> device name
  std::map<std::string, std::string> certs_;   // leaf DER -> device name (X509_CERTIFICATE)
  X509Identities identities_;                  // peer -> identity cached at the handshake
  // Observations and server-side RPC (tests/server/observe.cpp).
  ObserveHub hub_{[this](const std::string& line) { Log(line); }};

  std::map<std::string, Exchange> exchanges_;  // "peer#mid"
  std::map<std::string, OutCon> outgoing_;     // "peer#mid" of our CON messages
  std::map<std::string, BlockState> blocks_;   // "peer method uri"
  struct Task {
    int64_t at;
    std::function<void()> fn;
  };
  std::vector<Task> tasks_;

  // control switches
  int64_t drop_n_ = 0;
  bool drop_all_ = false;
  int64_t fail_n_ = 0;
  uint8_t fail_code_ = 0;
  std::optional<uint8_t> fail_all_;
  int64_t lose_provision_n_ = 0;
  int64_t delay_ms_ = 0;
  Block2Mode block2_mode_ = Block2Mode::kOff;
  ContinueMode continue_mode_ = ContinueMode::kOff;
  Faults faults_;
  std::map<std::string, int64_t> stats_;
};

// ---- setup --------------------------------------------------------------------------------------
bool Server::Init() {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_DGRAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICHOST;
  addrinfo* res = nullptr;
  std::string port = std::to_string(opt_.port);
  if (getaddrinfo(opt_.bind.c_str(), port.c_str(), &hints, &res) != 0 || !res) {
    std::cerr << "tb-test-server: bad --bind address " << opt_.bind << std::endl;
    return false;
  }
  fd_ = socket(res->ai_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd_ < 0 || bind(fd_, res->ai_addr, res->ai_addrlen) != 0) {
    std::cerr << "tb-test-server: cannot bind " << opt_.bind << ":" << opt_.port << ": "
              << std::strerror(errno) << std::endl;
    freeaddrinfo(res);
    return false;
  }
  freeaddrinfo(res);
  sockaddr_storage ss{};
  socklen_t sl = sizeof ss;
  getsockname(fd_, reinterpret_cast<sockaddr*>(&ss), &sl);
  opt_.port = ntohs(ss.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port
                                             : reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
  if (!opt_.record_file.empty()) {
    record_.open(opt_.record_file, std::ios::app);
    if (!record_) {
      std::cerr << "tb-test-server: cannot open --record " << opt_.record_file << std::endl;
      return false;
    }
  }
  LoadState();
  for (const auto& [name, token] : opt_.devices) {
    // A device given on the command line exists before any provisioning (§4.3 pre-provisioned).
    // If the state file already has it, the stored one (maybe already provisioned) wins.
    if (devices_.count(name)) continue;
    if (tokens_.count(token)) {
      std::cerr << "tb-test-server: token of --device " << name << " already used" << std::endl;
      return false;
    }
    devices_[name].token = token;
    tokens_[token] = name;
  }
  for (const auto& [name, file] : opt_.x509_devices) {
    // --device-x509: a device whose credential is a client certificate (§6.2 "Register the
    // device's leaf certificate in PEM"). A device already in the state file keeps its record.
    // A ThingsBoard device has one credential: not both --device and --device-x509.
    if (std::any_of(opt_.devices.begin(), opt_.devices.end(),
                    [&](const auto& d) { return d.first == name; })) {
      std::cerr << "tb-test-server: " << name << " is given by --device and --device-x509"
                << std::endl;
      return false;
    }
    if (devices_.count(name)) continue;
    std::ifstream in(file);
    std::stringstream pem;
    pem << in.rdbuf();
    const auto der = CertDerFromPem(pem.str());
    if (!in || !der) {
      std::cerr << "tb-test-server: --device-x509 " << name << ": no certificate in " << file
                << std::endl;
      return false;
    }
    if (certs_.count(*der)) {
      std::cerr << "tb-test-server: certificate of --device-x509 " << name << " already used"
                << std::endl;
      return false;
    }
    devices_[name];
    SetCertificate(name, pem.str(), *der);
  }
  SaveState();
  std::cout << "listening on " << opt_.port << std::endl;
  Log("tb-test-server: ThingsBoard CoAP emulation on " + opt_.bind + ":" +
      std::to_string(opt_.port) + " (strategy " +
      (opt_.pre_provisioned ? "pre_provisioned" : "allow_create") + ", framing " +
      FramingName(opt_.framing) + ")");
  return true;
}

int Server::Run() {
  while (!quit_ && !g_stop) {
    pollfd fds[2] = {{fd_, POLLIN, 0}, {0, POLLIN, 0}};
    int64_t next = NextTimer();
    int timeout =
        next < 0 ? 1000 : static_cast<int>(std::clamp<int64_t>(next - SteadyMs(), 0, 1000));
    int n = poll(fds, stdin_open_ ? 2 : 1, timeout);
    if (n < 0 && errno != EINTR) {
      std::cerr << "tb-test-server: poll: " << std::strerror(errno) << std::endl;
      return 1;
    }
    if (n > 0 && (fds[0].revents & POLLIN)) OnReadable();
    if (n > 0 && stdin_open_ && (fds[1].revents & (POLLIN | POLLHUP | POLLERR))) OnStdin();
    Timers();
  }
  SaveState();
  return 0;
}

// ---- datagram path ----------------------------------------------------------------------------
void Server::OnReadable() {
  // 64 KiB so an oversized datagram is seen whole and can be recorded as dropped (§1).
  static uint8_t buf[65536];
  for (;;) {
    Peer p;
    p.len = sizeof p.addr;
    ssize_t n = recvfrom(fd_, buf, sizeof buf, 0, reinterpret_cast<sockaddr*>(&p.addr), &p.len);
    if (n < 0) return;
    char host[INET6_ADDRSTRLEN] = "?";
    char serv[16] = "?";
    getnameinfo(reinterpret_cast<sockaddr*>(&p.addr), p.len, host, sizeof host, serv, sizeof serv,
                NI_NUMERICHOST | NI_NUMERICSERV);
    p.key = std::string(host) + ":" + serv;
    try {
      OnDatagram(buf, static_cast<size_t>(n), p);
    } catch (const std::exception& e) {
      // A test tool must survive any datagram; the request simply gets no answer.
      Count("internal_errors");
      Log(std::string("internal error on a datagram from ") + p.key + ": " + e.what());
    }
  }
}

void Server::OnDatagram(const uint8_t* d, size_t n, const Peer& peer) {
  ordered_json rec;
  rec["t"] = WallMs();
  rec["peer"] = peer.key;
  rec["datagram_bytes"] = n;
  if (auto pem = IdentityPem(d, n)) {
    OnIdentity(*pem, peer);  // from tb-test-dtls-proxy: not a request, never recorded as one
    return;
  }
  if (n > kUdpDatagramSize) {
    // §1: Californium's UDPConnector silently drops datagrams over 2048 bytes: no ACK, nothing.
    if (n >= 4) {
      rec["mid"] = (d[2] << 8) | d[3];
      rec["type"] = ((d[0] >> 4) & 3) == 0 ? "CON" : "NON";
    }
    rec["payload_bytes"] = n;
    rec["code"] = "dropped_oversize";
    Count("dropped_oversize");
    Record(rec);
    Log("dropped a " + std::to_string(n) + "-byte datagram from " + peer.key +
        " (over 2048 bytes, ThingsBoard drops it silently)");
    return;
  }
  auto msg = Decode(d, n);
  if (!msg) {
    // RFC 7252 §4.2/§4.3: a CON that cannot be processed is rejected with RST; others ignored.
    if (n >= 4 && (d[0] >> 6) == 1 && ((d[0] >> 4) & 3) == 0) {
      SendRst(peer, static_cast<uint16_t>((d[2] << 8) | d[3]));
    }
    rec["code"] = "malformed";
    Count("malformed");
    Record(rec);
    Log("malformed datagram from " + peer.key, 2);
    return;
  }
  if (msg->code == 0) {
    if (msg->type == MsgType::kAck || msg->type == MsgType::kRst) {
      OnAckOrRst(*msg, peer);
    } else if (msg->type == MsgType::kCon) {
      SendRst(peer, msg->mid);  // RFC 7252 §4.3: CoAP ping gets RST
    }
    return;
  }
  if ((msg->code >> 5) != 0 || msg->type == MsgType::kAck || msg->type == MsgType::kRst) {
    if (msg->type == MsgType::kCon) SendRst(peer, msg->mid);  // a response to nothing we sent
    return;
  }

  Request rq;
  rq.peer = peer;
  rq.msg = std::move(*msg);
  rq.con = rq.msg.type == MsgType::kCon;
  rq.datagram_bytes = n;
  rq.payload = rq.msg.payload;
  auto paths = rq.msg.All(kOptUriPath);
  if (paths.size() == 1 && paths[0].find('/') != std::string::npos) {
    // §0: TB's message deliverer splits a single Uri-Path option that contains slashes.
    std::stringstream ss(paths[0]);
    std::string seg;
    while (std::getline(ss, seg, '/'))
      if (!seg.empty()) rq.path.push_back(seg);
  } else {
    rq.path = paths;
  }
  rq.query = rq.msg.All(kOptUriQuery);

  static const char* kMethods[] = {"EMPTY",  "GET",   "POST",  "PUT",
                                   "DELETE", "FETCH", "PATCH", "iPATCH"};
  std::string path;
  for (const auto& s : rq.path) path += "/" + s;
  if (!rq.query.empty()) {
    path += "?";
    for (size_t i = 0; i < rq.query.size(); ++i) path += (i ? "&" : "") + rq.query[i];
  }
  rec["method"] = rq.msg.code < 8 ? kMethods[rq.msg.code] : CodeString(rq.msg.code);
  rec["path"] = path.empty() ? "/" : path;
  rec["feature"] = nullptr;
  rec["token"] = nullptr;
  rec["device"] = nullptr;
  rec["mid"] = rq.msg.mid;
  rec["coap_token"] = Hex(rq.msg.token);
  rec["type"] = rq.con ? "CON" : "NON";
  rec["payload"] = rq.msg.payload;
  rec["payload_bytes"] = rq.msg.payload.size();
  rec["block1"] = rq.msg.First(kOptBlock1).has_value();
  if (rq.path.size() >= 2 && rq.path[0] == "api" && rq.path[1] == "v1") {
    // Filled in before dispatch so dropped, duplicate and 2.31 records say what they were for.
    ApiPath ap = ParseApiPath(rq.path);
    if (ap.feature != Feature::kNone) rec["feature"] = FeatureName(ap.feature);
    if (ap.token) rec["token"] = *ap.token;
  }
  Count("requests");

  if (drop_all_ || drop_n_ > 0) {
    // Control "drop": the request is lost on the way in; nothing is remembered, so a
    // retransmission is processed as if it were the first copy.
    if (!drop_all_) --drop_n_;
    rec["code"] = "dropped";
    Count("dropped");
    Record(rec);
    Log("dropped " + rec["method"].get<std::string>() + " " + rec["path"].get<std::string>() +
        " (drop switch)");
    return;
  }

  const std::string exkey = peer.key + "#" + std::to_string(rq.msg.mid);
  auto it = exchanges_.find(exkey);
  if (it != exchanges_.end() &&
      SteadyMs() - it->second.created < (it->second.con ? kConLifetimeMs : kNonLifetimeMs)) {
    // §6.6: Californium's deduplicator keyed by (peer, MID); duplicates never reach TB again.
    rec["code"] = "duplicate";
    Count("duplicates");
    Record(rec);
    OnDuplicate(it->second, rq);
    Log("duplicate MID " + std::to_string(rq.msg.mid) + " from " + peer.key, 2);
    return;
  }

  if (opt_.strict_size && !rec["block1"].get<bool>() && rq.msg.payload.size() > kPreferredBlock) {
    // --strict-size: stricter than TB (which accepts 1025..2048-byte plain payloads, §1).
    rec["code"] = "dropped_oversize";
    Count("dropped_oversize");
    Record(rec);
    Log("dropped a " + std::to_string(rq.msg.payload.size()) +
        "-byte payload without Block1 (--strict-size)");
    return;
  }
  if (rq.msg.payload.size() > kPreferredBlock && !rec["block1"].get<bool>())
    rec["over_1024"] = true;  // accepted like TB, flagged so tests can assert it never happens

  Exchange ex;
  ex.created = SteadyMs();
  ex.con = rq.con;
  exchanges_[exkey] = ex;
  Process(rq, exkey, rec);
}

void Server::OnDuplicate(Exchange& ex, const Request& rq) {
  if (!ex.con || ex.lost) return;  // duplicate NON dropped; a lost answer stays lost
  if (!ex.piggy.empty()) {
    SendRaw(rq.peer, ex.piggy);  // re-send the ACK / piggybacked answer
    return;
  }
  if (ex.empty_acked || ex.con_mid) {
    // Answer was (or will be) a separate CON: re-ACK, and re-send the CON if still un-ACKed.
    SendEmptyAck(rq.peer, rq.msg.mid);
    if (ex.con_mid) {
      auto o = outgoing_.find(rq.peer.key + "#" + std::to_string(*ex.con_mid));
      if (o != outgoing_.end()) SendRaw(o->second.peer, o->second.bytes);
    }
  }
  // else: the answer is not ready yet and nothing was sent: ignored, like Californium.
}

void Server::Process(Request& rq, const std::string& exkey, ordered_json& rec) {
  Reply rp;
  const auto block2 = rq.msg.Uint(kOptBlock2);
  if (block2_mode_ != Block2Mode::kOff && block2 && Block::FromUint(*block2).num > 0) {
    // "block2 endless": a request for a later block of an endless answer; nothing is processed.
    const Block b = Block::FromUint(*block2);
    rp = EndlessBlock(b.num, b.szx == 7 ? 6 : b.szx, rec);
  } else if (auto early = HandleBlock1(rq, rec)) {
    rp = *early;
  } else {
    rp = Dispatch(rq, rec);
    if (block2_mode_ != Block2Mode::kOff && rp.code == kCreated) {
      // "block2 endless": the request was processed (stored, provisioned) as usual, but its
      // 2.01 becomes block 0 of an answer that never ends.
      Reply first = EndlessBlock(0, 6, rec);
      const size_t size = first.payload.size();
      first.payload = rp.payload.substr(0, size);
      first.payload.resize(size, ' ');
      first.content_format = rp.content_format;
      rp = first;
    }
  }
  Deliver(rq, rp, exkey, rec);  // writes the record before anything goes on the wire
}

Reply Server::EndlessBlock(uint32_t num, uint8_t szx, ordered_json& rec) {
  // Piggybacked, never a separate CON: libcoap 4.3.1 drops a Block2 answer that arrives as a
  // separate response to a request it keeps no block state for ("large body receive internal
  // issue"), so only a piggybacked one makes it ask for more.
  Reply rp;
  rp.code = kCreated;
  rp.block2 = Block{num, true, szx}.Encode();                          // M=1, always
  if (block2_mode_ == Block2Mode::kHugeSize2) rp.size2 = 0xFFFFFFFFu;  // 2^32 - 1
  rp.payload.assign(Block{num, true, szx}.Size(), 'x');
  rec["block2_num"] = num;
  rec["hostile"] = "block2 " + ModeName(kBlock2Modes, block2_mode_);
  Count("hostile_answers");
  return rp;
}

// "continue MODE": a 2.31 Continue that ends the Block1 transfer instead of continuing it. The
// transfer is forgotten and nothing is stored.
std::optional<Reply> Server::HostileContinue(const Block& b, ordered_json& rec) {
  Reply rp;
  rp.code = kContinue;
  switch (continue_mode_) {
    case ContinueMode::kOff:
      return std::nullopt;
    case ContinueMode::kNoBlock1:
      rp.no_block1 = true;
      break;
    case ContinueMode::kLastBlock:
      if (b.more) return std::nullopt;  // the usual 2.31 up to the last block
      rp.block1 = Block{b.num, true, b.szx}.Encode();
      break;
    case ContinueMode::kWildNum:
      rp.block1 = Block{b.num + 1000, true, b.szx}.Encode();
      break;
    case ContinueMode::kSzx7:
      rp.block1 = Block{b.num, true, 7}.Encode();
      break;
  }
  rec["hostile"] = "continue " + ModeName(kContinueModes, continue_mode_);
  Count("hostile_answers");
  return rp;
}

// RFC 7959 Block1 upload, as Californium's BlockwiseLayer does it below TB (§1).
std::optional<Reply> Server::HandleBlock1(Request& rq, ordered_json& rec) {
  auto raw = rq.msg.Uint(kOptBlock1);
  if (!raw) return std::nullopt;
  Block b = Block::FromUint(*raw);
  Reply rp;
  if (b.szx == 7) {
    // SZX 7 is reserved on UDP (BERT is TCP-only, RFC 8323); TB's block size is 1024 (SZX 6).
    rp.code = kBadOption;
    rec["block_error"] = "szx 7 not allowed on UDP";
    return rp;
  }
  auto size1 = rq.msg.Uint(kOptSize1);
  if (size1 && *size1 > kMaxBody) {
    rp.code = kTooLarge;  // §1: 4.13 only for a Size1 above 256 MiB
    return rp;
  }
  std::string key =
      rq.peer.key + " " + std::to_string(rq.msg.code) + " " + rec["path"].get<std::string>();
  auto cf = rq.msg.Uint(kOptContentFormat);
  auto it = blocks_.find(key);
  if (b.num == 0) {
    BlockState st;
    st.szx = b.szx;
    st.cf = cf;
    it = blocks_.insert_or_assign(key, st).first;
  } else if (it == blocks_.end() || b.num * b.Size() != it->second.body.size()) {
    rp.code = kIncomplete;  // out-of-order or unknown transfer
    rec["block_error"] = "unexpected block " + std::to_string(b.num);
    if (it != blocks_.end()) blocks_.erase(it);
    return rp;
  } else if (it->second.cf != cf) {
    rp.code = kIncomplete;  // §1: Content-Format changed mid-transfer -> 4.08
    rec["block_error"] = "content-format changed";
    blocks_.erase(it);
    return rp;
  }
  if (b.more && rq.msg.payload.size() != b.Size()) {
    rp.code = kBadRequest;
    rec["block_error"] = "non-final block of wrong size";
    blocks_.erase(it);
    return rp;
  }
  if (auto code = faults_.TakeForBlock1(b)) {
    // Control "fault block1-abort|block1-refuse" (faults.h): a transfer broken off or refused.
    rp.code = *code;
    rec["fault"] = *code == kTooLarge ? "block1-refuse" : "block1-abort";
    rec["block_num"] = b.num;
    Count("fault_answers");
    blocks_.erase(it);
    return rp;
  }
  if (auto hostile = HostileContinue(b, rec)) {
    rec["block_num"] = b.num;
    rec["block_size"] = b.Size();
    blocks_.erase(it);
    return hostile;
  }
  BlockState& st = it->second;
  st.body += rq.msg.payload;
  st.touched = SteadyMs();
  st.next_num = b.num + 1;
  rec["block_num"] = b.num;
  rec["block_size"] = b.Size();
  if (st.body.size() > kMaxBody) {
    rp.code = kTooLarge;
    blocks_.erase(it);
    return rp;
  }
  if (b.more) {
    rp.code = kContinue;
    rec["block1_echo"] = Block{b.num, true, b.szx}.Encode();
    return rp;  // 2.31 goes back piggybacked (Californium answers blocks itself)
  }
  rq.payload = std::move(st.body);
  rq.block1_final = Block{b.num, false, b.szx};
  blocks_.erase(it);
  rec["payload"] = rq.payload;
  rec["payload_bytes"] = rq.payload.size();
  rec["blocks"] = b.num + 1;
  return std::nullopt;
}

const std::string* Server::DeviceByToken(const std::optional<std::string>& token) {
  if (!token) return nullptr;
  auto it = tokens_.find(*token);
  return it == tokens_.end() ? nullptr : &it->second;
}

// §6.2 "X.509 identity check", as ThingsBoard does it during the handshake: the leaf is looked up
// among the devices' X509_CERTIFICATE credentials *now*, and only a match is cached under the
// peer. So a device provisioned with this certificate later in the same session is not found
// until a new handshake (a new identity datagram).
void Server::OnIdentity(std::string_view pem, const Peer& peer) {
  identities_.Forget(peer.key);
  if (pem.empty()) {
    Log("DTLS session " + peer.key + " without a client certificate");
    return;
  }
  const auto der = CertDerFromPem(pem);
  if (!der) {
    Count("x509_malformed");
    Log("x509 identity of " + peer.key + ": not a PEM certificate, ignored");
    return;
  }
  auto it = certs_.find(*der);
  if (it == certs_.end()) {
    Count("x509_unknown");
    Log("x509 identity of " + peer.key + ": certificate " + CertFingerprint(*der) +
        " is not registered (token-less requests get 4.01)");
    return;
  }
  Count("x509_identities");
  identities_.Set(peer.key, it->second, *der);
  Log("x509 identity of " + peer.key + ": device " + it->second + " (certificate " +
      CertFingerprint(*der) + ")");
}

const std::string* Server::DeviceByIdentity(const Peer& peer) const {
  const X509Identities::Entry* e = identities_.Find(peer.key);
  if (!e) return nullptr;
  auto d = devices_.find(e->device);
  // Revoked or deleted since the handshake: the cached identity no longer names a device.
  if (d == devices_.end() || d->second.x509_der != e->der) return nullptr;
  return &d->first;
}

bool Server::SetCertificate(const std::string& name, const std::string& pem,
                            const std::string& der) {
  if (certs_.count(der)) return false;
  Device& d = devices_[name];
  d.x509_pem = pem;
  d.x509_der = der;
  certs_[der] = name;
  return true;
}

void Server::DropCertificate(const std::string& name) {
  auto d = devices_.find(name);
  if (d != devices_.end() && !d->second.x509_der.empty()) {
    certs_.erase(d->second.x509_der);
    d->second.x509_pem.clear();
    d->second.x509_der.clear();
  }
  identities_.ForgetDevice(name);
}

std::optional<Reply> Server::FailSwitch() {
  Reply rp;
  if (fail_n_ > 0) {
    --fail_n_;
    rp.code = fail_code_;
  } else if (fail_all_) {
    rp.code = *fail_all_;
  } else {
    return std::nullopt;
  }
  rp.success = (rp.code >> 5) == 2;
  return rp;
}

Reply Server::Dispatch(const Request& rq, ordered_json& rec) {
  Reply rp;
  const auto& seg = rq.path;
  const uint8_t method = rq.msg.code;
  const bool get = method == 1;
  const bool post = method == 2;
  if (seg.empty()) {
    rp.code = get ? kContent : kMethodNotAllowed;  // Californium's root resource
    rp.payload = "tb-test-server: ThingsBoard CoAP emulation";
    rp.content_format = 0;
    return rp;
  }
  if (seg[0] == ".well-known" && seg.size() == 2 && seg[1] == "core") {
    rp.code = get ? kContent : kMethodNotAllowed;  // §0: Californium discovery resource
    if (get) {
      rp.payload = "</api>,</api/v1>,</fw>,</sw>";
      rp.content_format = 40;
    }
    return rp;
  }
  if (seg[0] == "fw" || seg[0] == "sw") {
    // §5.2: OTA resource. No packages are emulated, so a valid token gets 4.04 (no package).
    if (!get) {
      rp.code = kMethodNotAllowed;
    } else if (seg.size() != 2 || !DeviceByToken(seg[1])) {
      rp.code = kUnauthorized;
    } else {
      rp.code = kNotFound;
    }
    rec["feature"] = seg[0];
    return rp;
  }
  if (seg[0] != "api" || (seg.size() >= 2 && seg[1] != "v1")) {
    rp.code = kNotFound;  // §0: any other first segment, /api/v2/... -> 4.04
    return rp;
  }
  if (seg.size() == 1) {
    rp.code = kMethodNotAllowed;  // §0: /api has no handlers -> 4.05
    return rp;
  }
  if (!get && !post) {
    rp.code = kMethodNotAllowed;  // §0: PUT/DELETE/FETCH/PATCH/iPATCH -> 4.05
    return rp;
  }
  return DispatchApi(rq, rec);
}

Reply Server::DispatchApi(const Request& rq, ordered_json& rec) {
  Reply rp;
  const bool get = rq.msg.code == 1;
  ApiPath p = ParseApiPath(rq.path);
  if (p.feature != Feature::kNone) rec["feature"] = FeatureName(p.feature);
  if (p.token) rec["token"] = *p.token;
  if (p.feature == Feature::kNone || p.feature == Feature::kUnknown) {
    rp.code = kBadRequest;  // §0: missing or unknown feature -> 4.00
    return rp;
  }
  auto observe = rq.msg.Uint(kOptObserve);
  if (get) {
    // §0 method table: GET telemetry -> 4.00 always; GET rpc/claim/provision without Observe ->
    // 4.00; GET with Observe on claim/provision is treated as an attribute subscription.
    if (p.feature == Feature::kTelemetry || (!observe && p.feature != Feature::kAttributes)) {
      rp.code = kBadRequest;
      return rp;
    }
  } else if (p.feature == Feature::kProvision) {
    if (!rq.block1_final && continue_mode_ == ContinueMode::kNoBlock1)
      return *HostileContinue(Block{}, rec);  // "continue no-block1": nothing provisioned
    return Provision(rq, rec);                // §4: no authentication
  }
  // §0 "How the device is identified": an X.509 identity cached at the handshake wins, and any
  // token in the URI is then ignored; otherwise the token is checked on every request.
  const std::string* dev = DeviceByIdentity(rq.peer);
  const bool by_x509 = dev != nullptr;
  if (!dev) dev = DeviceByToken(p.token);
  if (!dev) {
    // §0: token missing (3-segment X.509 form without DTLS identity), unknown or revoked -> 4.01.
    rp.code = kUnauthorized;
    Count("unauthorized");
    Log(std::string("rejected ") + (get ? "GET " : "POST ") + rec["path"].get<std::string>() +
        (p.token ? ": unknown or revoked token (4.01)"
                 : ": no token and no X.509 identity for " + rq.peer.key + " (4.01)"));
    return rp;
  }
  const std::string name = *dev;
  rec["device"] = name;
  rec["identity"] = by_x509 ? "x509" : "token";
  if (get && observe) return Observe(name, p.feature, rq, rec);
  if ((p.feature == Feature::kTelemetry || p.feature == Feature::kAttributes) && !get &&
      !rq.block1_final && continue_mode_ == ContinueMode::kNoBlock1) {
    return *HostileContinue(Block{}, rec);  // "continue no-block1" on a plain request too
  }
  if (p.feature == Feature::kTelemetry || p.feature == Feature::kAttributes) {
    if (auto f = FailSwitch()) {
      rec["forced"] = true;
      Log("answered " + std::string(FeatureName(p.feature)) + " from " + name + " with forced " +
          CodeString(f->code));
      return *f;
    }
  }
  switch (p.feature) {
    case Feature::kTelemetry:
      return PostTelemetry(name, rq, rec);
    case Feature::kAttributes:
      return get ? GetAttributes(name, rq) : PostAttributes(name, rq, rec);
    case Feature::kRpc: {
      if (!p.request_id) {
        // §3.2: client-side RPC needs a rule chain; none is emulated, so like TB with no
        // "rpc call reply" node there is never an answer (only the empty ACK).
        rp.none = true;
        return rp;
      }
      // §3.1: the reply must be a JSON object, else an uncaught error -> 5.00 [inferred]; the id
      // of the 5+-segment form must parse as an int.
      json j = json::parse(rq.payload, nullptr, false);
      bool id_ok = std::all_of(p.request_id->begin(), p.request_id->end(),
                               [](unsigned char c) { return std::isdigit(c); });
      rp.code = (j.is_discarded() || !j.is_object() || !id_ok) ? Code(5, 0) : kCreated;
      rp.success = rp.code == kCreated;
      if (rp.success) {
        int64_t id = -1;
        auto [ptr, ec] =
            std::from_chars(p.request_id->data(), p.request_id->data() + p.request_id->size(), id);
        if (ec == std::errc() && ptr == p.request_id->data() + p.request_id->size()) {
          rec["rpc_id"] = id;
          hub_.OnRpcReply(name, id, j);
        } else {
          rp.code = Code(5, 0);  // §0: the id must parse as an int
          rp.success = false;
        }
      }
      return rp;
    }
    case Feature::kClaim: {
      // §5.1: empty payload allowed; anything that is not a JSON object -> 4.00.
      json j = json::parse(rq.payload, nullptr, false);
      rp.code =
          (rq.payload.empty() || (!j.is_discarded() && j.is_object())) ? kCreated : kBadRequest;
      rp.success = rp.code == kCreated;
      return rp;
    }
    default:
      rp.code = kBadRequest;
      return rp;
  }
}

Reply Server::PostTelemetry(const std::string& dev, const Request& rq, ordered_json& rec) {
  Reply rp;
  ParseResult r = ParseTelemetry(rq.payload, WallMs());  // §1: server time for flat objects
  if (r.code) {
    rp.code = r.code;
    Log("rejected telemetry from " + dev + " (" + CodeString(r.code) + ")");
    return rp;
  }
  json pts = json::array();
  for (auto& pt : r.points) {
    pts.push_back(json::array({pt.key, pt.ts, pt.value}));
  }
  rec["points"] = pts;
  Count("points", static_cast<int64_t>(r.points.size()));
  // Points live in the request record (appended across restarts, read by tbserver.py), not in
  // the state file: rewriting every point on every request made a long drain quadratic.
  rp.code = kCreated;  // §1: 2.01, empty payload, no Content-Format
  rp.success = true;
  Log("telemetry from " + dev + ": " + std::to_string(r.points.size()) + " point" +
      (r.points.size() == 1 ? "" : "s"));
  return rp;
}

Reply Server::PostAttributes(const std::string& dev, const Request& rq, ordered_json& rec) {
  Reply rp;
  ParseResult r = ParseAttributes(rq.payload);
  if (r.code) {
    rp.code = r.code;
    Log("rejected attributes from " + dev + " (" + CodeString(r.code) + ")");
    return rp;
  }
  Device& d = devices_[dev];
  for (auto it = r.attributes.begin(); it != r.attributes.end(); ++it)
    d.client[it.key()] = it.value();
  rec["attributes"] = r.attributes;
  SaveState();
  rp.code = kCreated;  // §2.1
  rp.success = true;
  Log("attributes from " + dev + ": " + std::to_string(r.attributes.size()) + " key" +
      (r.attributes.size() == 1 ? "" : "s"));
  return rp;
}

Reply Server::GetAttributes(const std::string& dev, const Request& rq) {
  // §2.2: Uri-Query options with exactly one '=', comma-separated names, empty lists ignored.
  std::optional<std::vector<std::string>> client, shared;
  for (const auto& q : rq.query) {
    if (std::count(q.begin(), q.end(), '=') != 1) continue;
    auto eq = q.find('=');
    std::string name = q.substr(0, eq);
    std::vector<std::string> keys;
    std::stringstream ss(q.substr(eq + 1));
    std::string k;
    while (std::getline(ss, k, ','))
      if (!k.empty()) keys.push_back(k);
    if (keys.empty()) continue;
    if (name == "clientKeys") client = keys;
    if (name == "sharedKeys") shared = keys;
  }
  const bool all = !client && !shared;
  const Device& d = devices_[dev];
  auto pick = [](const json& scope, const std::optional<std::vector<std::string>>& keys,
                 bool take_all) {
    json out = json::object();
    if (take_all) return scope;
    if (!keys) return out;
    for (const auto& k : *keys)
      if (scope.contains(k)) out[k] = scope[k];
    return out;
  };
  json c = pick(d.client, client, all);
  json s = pick(d.shared, shared, all);
  Reply rp;
  if (c.empty() && s.empty()) {
    rp.code = kNotFound;  // §2.2: nothing found -> 4.04
    return rp;
  }
  json body = json::object();
  if (!c.empty()) body["client"] = c;
  if (!s.empty()) body["shared"] = s;
  rp.code = kContent;
  rp.success = true;  // §8: 2.05 of an attribute GET is a separate CON too
  rp.payload = body.dump();
  rp.content_format = rq.msg.Uint(kOptContentFormat).value_or(50);
  Log("attribute request from " + dev);
  return rp;
}

Reply Server::Observe(const std::string& dev, Feature f, const Request& rq, ordered_json& rec) {
  Reply rp;
  uint32_t obs = *rq.msg.Uint(kOptObserve);
  bool rpc = f == Feature::kRpc;
  rec["observe"] = obs;
  if (obs != 0) {
    // §2.3: deregistration; what TB answers is uncertain, we only ACK (no response).
    hub_.Deregister(dev, rpc);
    rp.none = true;
    return rp;
  }
  const Peer peer = rq.peer;
  const std::optional<uint32_t> cf = rq.msg.Uint(kOptContentFormat);
  hub_.Register(dev, rpc, peer.key, rq.msg.token, rq.con, cf,
                [this, peer](Message m, bool con, const std::string& what) -> uint16_t {
                  if (con) return SendCon(peer, std::move(m), what);
                  m.type = MsgType::kNon;
                  m.mid = ++mid_;
                  SendRaw(peer, Encode(m));
                  return m.mid;
                });
  rp.observe = 0;
  if (rpc) {
    rp.code = kValid;  // §3.1: 2.03, empty, Observe=0, separate CON for a CON request (§8)
    rp.success = true;
  } else {
    rp.code = kContent;  // §2.3: all shared attributes as a flat object; piggybacked (§8)
    rp.payload = devices_[dev].shared.dump();
    rp.content_format = cf.value_or(50);
  }
  Log("device " + dev + " subscribed to " + (rpc ? "RPC" : "shared attributes"));
  return rp;
}

Reply Server::Provision(const Request& rq, ordered_json& rec) {
  Reply rp;
  rp.content_format = 0;  // §4.2: the JSON answers are labelled text/plain
  auto answer = [&](uint8_t code, ordered_json body) {
    rp.code = code;
    rp.payload = body.dump();
    rec["provision_status"] = body["status"];
    return rp;
  };
  auto failure = [&](const std::string& why) {
    Log("provisioning failed: " + why);
    return answer(kBadRequest,
                  {{"errorMsg", "Failed to provision device!"}, {"status", "FAILURE"}});
  };
  if (lose_provision_n_ > 0) {
    --lose_provision_n_;
    rp.lost = true;  // processed fully below, answer discarded in Deliver()
  }
  json j = json::parse(rq.payload, nullptr, false);
  auto as_string = [](const json& v) -> std::optional<std::string> {
    if (v.is_string()) return v.get<std::string>();
    if (v.is_number() || v.is_boolean()) return v.dump();  // Gson getAsString on primitives
    return std::nullopt;
  };
  // §4.2 "Other errors": not a JSON object (protobuf fallback is not emulated), missing key or
  // secret field, or an invalid credentialsType -> 4.00 with an empty body.
  if (j.is_discarded() || !j.is_object() || !j.contains("provisionDeviceKey") ||
      !j.contains("provisionDeviceSecret")) {
    rp.code = kBadRequest;
    rp.content_format.reset();
    Log("provisioning request rejected: not a JSON object with key and secret (4.00)");
    return rp;
  }
  std::string ctype = "ACCESS_TOKEN";
  if (j.contains("credentialsType")) {
    auto c = as_string(j["credentialsType"]);
    static const std::vector<std::string> kTypes = {"ACCESS_TOKEN", "X509_CERTIFICATE",
                                                    "MQTT_BASIC", "LWM2M_CREDENTIALS"};
    if (!c || std::find(kTypes.begin(), kTypes.end(), *c) == kTypes.end()) {
      rp.code = kBadRequest;
      rp.content_format.reset();
      return rp;
    }
    ctype = *c;
  }
  auto key = as_string(j["provisionDeviceKey"]);
  auto secret = as_string(j["provisionDeviceSecret"]);
  if (!key || !secret || key->empty() || secret->empty() || opt_.provision_key.empty() ||
      *key != opt_.provision_key || *secret != opt_.provision_secret) {
    Log("provisioning rejected: wrong provision key/secret (NOT_FOUND)");
    return answer(kBadRequest,
                  {{"errorMsg", "Provision data was not found!"}, {"status", "NOT_FOUND"}});
  }
  std::optional<std::string> name;
  if (j.contains("deviceName") && !j["deviceName"].is_null()) {
    auto n = as_string(j["deviceName"]);
    if (!n) return failure("deviceName is not a string");
    const auto b = n->find_first_not_of(" \t\r\n\f\v");
    if (b == std::string::npos) return failure("whitespace-only deviceName");  // §4.1
    name = n->substr(b, n->find_last_not_of(" \t\r\n\f\v") - b + 1);
  }
  rec["provision_name"] = name ? json(*name) : json(nullptr);
  if (ctype != "ACCESS_TOKEN" && ctype != "X509_CERTIFICATE")
    return failure("only ACCESS_TOKEN and X509_CERTIFICATE credentials are emulated");
  std::string token;
  std::string credentials_type = "ACCESS_TOKEN";
  if (opt_.pre_provisioned) {
    // §4.3 CHECK_PRE_PROVISIONED_DEVICES: device must exist, first request returns its existing
    // token (credentials in the request ignored), any later request -> FAILURE.
    if (!name) return failure("no deviceName under pre_provisioned");
    auto it = devices_.find(*name);
    if (it == devices_.end()) return failure("device " + *name + " does not exist");
    if (it->second.provisioned) return failure("device " + *name + " already provisioned");
    it->second.provisioned = true;
    token = it->second.token;
    if (!it->second.x509_pem.empty()) {
      token = it->second.x509_pem;  // the device's existing credential is its certificate
      credentials_type = "X509_CERTIFICATE";
    }
  } else if (ctype == "X509_CERTIFICATE") {
    // §4.1: "hash" is the client certificate in PEM; it becomes the device's X509_CERTIFICATE
    // credential. Missing, not a certificate, or already another device's -> FAILURE (§4.2, as
    // for a requested token already in use).
    if (!name) name = RandomAlnum(20);  // §4.1
    if (devices_.count(*name)) return failure("device " + *name + " already exists");
    std::optional<std::string> pem;
    if (j.contains("hash") && !j["hash"].is_null()) pem = as_string(j["hash"]);
    if (!pem || pem->empty()) return failure("X509_CERTIFICATE without a hash (certificate)");
    const auto der = CertDerFromPem(*pem);
    if (!der) return failure("hash is not a PEM certificate");
    if (auto used = certs_.find(*der); used != certs_.end())
      return failure("certificate already used by device " + used->second);
    devices_[*name].provisioned = true;
    SetCertificate(*name, *pem, *der);
    token = *pem;
    credentials_type = "X509_CERTIFICATE";
  } else {
    // §4.3 ALLOW_CREATE_NEW_DEVICES: second request with the same name -> FAILURE; the requested
    // token is honoured unless another device uses it; otherwise a generated one.
    if (!name) name = RandomAlnum(20);  // §4.1: random 20-char alphanumeric name
    if (devices_.count(*name)) return failure("device " + *name + " already exists");
    if (j.contains("token") && !j["token"].is_null()) {
      auto t = as_string(j["token"]);
      if (t && !t->empty()) token = *t;
    }
    if (!token.empty() && tokens_.count(token)) return failure("requested token already in use");
    if (token.empty()) do
        token = RandomAlnum(20);
      while (tokens_.count(token));
    Device d;
    d.token = token;
    d.provisioned = true;
    devices_[*name] = d;
    tokens_[token] = *name;
  }
  rec["provision_name"] = *name;
  SaveState();
  Log("provisioned device " + *name +
      (credentials_type == "X509_CERTIFICATE" ? " (X.509 certificate)" : "") +
      (rp.lost ? " (reply deliberately lost)" : ""));
  Count("provisioned");
  ordered_json body;
  body["credentialsValue"] = token;
  body["credentialsType"] = credentials_type;
  body["status"] = "SUCCESS";
  rec["provision_status"] = "SUCCESS";
  rp.code = kCreated;
  rp.payload = body.dump();
  return rp;
}

// ---- framing (§8) -----------------------------------------------------------------------------
Message Server::BaseResponse(const Request& rq, const Reply& rp) {
  Message m;
  m.code = rp.code;
  m.token = rq.msg.token;
  m.payload = rp.payload;
  if (rp.content_format) m.AddUint(kOptContentFormat, *rp.content_format);
  if (rp.observe) m.AddUint(kOptObserve, *rp.observe);
  if (rp.block1) {
    m.AddUint(kOptBlock1, *rp.block1);
  } else if (rp.no_block1) {
    // hostile: no Block1 at all
  } else if (rp.code == kContinue && rq.msg.Uint(kOptBlock1)) {
    m.AddUint(kOptBlock1, Block::FromUint(*rq.msg.Uint(kOptBlock1)).Encode() | 0x8u);
  } else if (rq.block1_final) {
    m.AddUint(kOptBlock1, rq.block1_final->Encode());
  }
  if (rp.block2) m.AddUint(kOptBlock2, *rp.block2);
  if (rp.size2) m.AddUint(kOptSize2, *rp.size2);
  return m;
}

void Server::Deliver(const Request& rq, Reply rp, const std::string& exkey, ordered_json& rec) {
  rec["code"] = rp.none ? "none" : CodeString(rp.code);
  if (!rp.lost && !rp.none) rp.fault = faults_.TakeForAnswer();
  if (rp.fault != FaultMode::kOff) {
    rec["fault"] = Faults::Name(rp.fault);
    Count("fault_answers");
  }
  if (rp.lost) {
    // Control "lose-provision-reply": the answer and its ACK are lost, and stay lost for every
    // retransmission of this MID; only a new request (new MID) gets an answer (FAILURE, §4.3).
    rec["reply"] = "lost";
    exchanges_[exkey].lost = true;
    Count("lost_replies");
    Record(rec);
    return;
  }
  if (rp.none) {
    rec["reply"] = "none";
    Record(rec);
    if (rq.con) {
      // No answer ever; Californium empty-ACKs after the piggyback timeout (§6.4).
      Peer peer = rq.peer;
      uint16_t mid = rq.msg.mid;
      After(kPiggybackTimeoutMs, [this, peer, mid, exkey] {
        SendEmptyAck(peer, mid);
        auto e = exchanges_.find(exkey);
        if (e != exchanges_.end()) e->second.empty_acked = true;
      });
    }
    return;
  }
  const bool separate_success = rp.success && opt_.framing != Framing::kPiggyback;
  if (!rq.con) {
    rec["reply"] = "non";
  } else if (delay_ms_ > kPiggybackTimeoutMs ||
             (separate_success && opt_.framing == Framing::kSeparate)) {
    rec["reply"] = "separate";
  } else {
    rec["reply"] = separate_success ? "con-no-ack" : "piggyback";
  }
  if (delay_ms_ > 0) rec["delay_ms"] = delay_ms_;
  // Recorded before sending: a test that saw the answer must also find the record.
  Record(rec);
  if (delay_ms_ <= 0) {
    Final(rq, rp, exkey);
    return;
  }
  if (rq.con && delay_ms_ > kPiggybackTimeoutMs) {
    // §6.4/§8: not ready within 500 ms -> empty ACK now, the answer later as a separate message.
    Peer peer = rq.peer;
    uint16_t mid = rq.msg.mid;
    After(kPiggybackTimeoutMs, [this, peer, mid, exkey] {
      SendEmptyAck(peer, mid);
      auto e = exchanges_.find(exkey);
      if (e != exchanges_.end()) e->second.empty_acked = true;
    });
  }
  After(delay_ms_, [this, rq, rp, exkey] { Final(rq, rp, exkey); });
}

void Server::Final(const Request& rq, const Reply& rp, const std::string& exkey) {
  Exchange scratch;
  auto e = exchanges_.find(exkey);
  Exchange& ex = e != exchanges_.end() ? e->second : scratch;
  ex.answered = true;
  Message m = BaseResponse(rq, rp);
  const std::string what = CodeString(rp.code) + " " + (rq.path.empty() ? "" : rq.path.back());
  // Control "fault reorder": an answer held back goes out after this one (faults.h).
  std::optional<Faults::Held> late;
  if (faults_.held && faults_.held->peer_key == rq.peer.key) late.swap(faults_.held);
  struct SendLate {
    Server* s;
    const Peer& p;
    std::optional<Faults::Held>& late;
    ~SendLate() {
      if (late) s->SendRaw(p, late->bytes);
    }
  } send_late{this, rq.peer, late};
  switch (rp.fault) {
    case FaultMode::kAckOnly:  // the answer never comes, only the empty ACK
      if (rq.con && !ex.empty_acked) SendEmptyAck(rq.peer, rq.msg.mid);
      ex.empty_acked = true;
      return;
    case FaultMode::kWrongToken:
      m.token = Faults::OtherToken(m.token);
      break;
    case FaultMode::kTruncate:
    case FaultMode::kOversize:
    case FaultMode::kReorder: {
      // Sent once as shaped, never retransmitted; the exchange is left without an answer, so a
      // retransmission of the request gets nothing either (a lost or mangled answer).
      m.type = rq.con && !ex.empty_acked ? MsgType::kAck : rq.con ? MsgType::kCon : MsgType::kNon;
      m.mid = m.type == MsgType::kAck ? rq.msg.mid : ++mid_;
      std::string bytes = Faults::Shape(rp.fault, m);
      ex.lost = true;
      if (rp.fault == FaultMode::kReorder)
        faults_.held = Faults::Held{std::move(bytes), rq.peer.key};
      else
        SendRaw(rq.peer, bytes);
      return;
    }
    default:
      break;
  }
  if (!rq.con) {
    m.type = MsgType::kNon;  // §6.6: a NON request gets a NON response (new MID)
    m.mid = ++mid_;
    SendRaw(rq.peer, Encode(m));
    if (rp.fault == FaultMode::kDuplicate) {
      m.mid = ++mid_;
      SendRaw(rq.peer, Encode(m));
    }
    return;
  }
  if (rp.fault == FaultMode::kDuplicate && (ex.empty_acked || rp.success)) {
    // A second CON answer with a new MID and the same token, besides the real one below.
    m.type = MsgType::kCon;
    m.mid = ++mid_;
    SendRaw(rq.peer, Encode(m));
  }
  if (ex.empty_acked) {
    m.type = MsgType::kCon;  // separate answer after the empty ACK
    ex.con_mid = SendCon(rq.peer, m, what);
    return;
  }
  if (rp.success && opt_.framing != Framing::kPiggyback) {
    if (opt_.framing == Framing::kSeparate) {
      SendEmptyAck(rq.peer, rq.msg.mid);
      ex.empty_acked = true;
    }
    // §8: TB forces the success response to CON: same token, new MID, no prior empty ACK.
    m.type = MsgType::kCon;
    ex.con_mid = SendCon(rq.peer, m, what);
    return;
  }
  m.type = MsgType::kAck;  // piggybacked: errors, provisioning answers, 2.31 (§8)
  m.mid = rq.msg.mid;
  ex.piggy = Encode(m);
  SendRaw(rq.peer, ex.piggy);
  if (rp.fault == FaultMode::kDuplicate) SendRaw(rq.peer, ex.piggy);
}

void Server::SendRaw(const Peer& p, const std::string& bytes) {
  sendto(fd_, bytes.data(), bytes.size(), 0, reinterpret_cast<const sockaddr*>(&p.addr), p.len);
}

void Server::SendEmptyAck(const Peer& p, uint16_t mid) {
  Message m;
  m.type = MsgType::kAck;
  m.mid = mid;
  SendRaw(p, Encode(m));
}

void Server::SendRst(const Peer& p, uint16_t mid) {
  Message m;
  m.type = MsgType::kRst;
  m.mid = mid;
  SendRaw(p, Encode(m));
}

uint16_t Server::SendCon(const Peer& p, Message m, const std::string& what) {
  m.type = MsgType::kCon;
  m.mid = ++mid_;
  OutCon o;
  o.peer = p;
  o.bytes = Encode(m);
  // RFC 7252 §4.2: initial timeout random in [ACK_TIMEOUT, ACK_TIMEOUT * 1.5].
  o.timeout = kAckTimeoutMs + static_cast<int64_t>(rng_() % (kAckTimeoutMs / 2 + 1));
  o.next = SteadyMs() + o.timeout;
  o.what = what;
  SendRaw(p, o.bytes);
  outgoing_[p.key + "#" + std::to_string(m.mid)] = std::move(o);
  return m.mid;
}

void Server::OnAckOrRst(const Message& m, const Peer& peer) {
  auto it = outgoing_.find(peer.key + "#" + std::to_string(m.mid));
  if (it == outgoing_.end()) return;
  Count(m.type == MsgType::kAck ? "con_acked" : "con_reset");
  outgoing_.erase(it);
  // An ACK lets a coalesced notification go; RST to a notification cancels it (§2.3).
  if (m.type == MsgType::kRst) {
    hub_.OnRst(peer.key, m.mid);
  } else {
    hub_.OnAck(peer.key, m.mid);
  }
}

int64_t Server::NextTimer() {
  int64_t next = -1;
  auto take = [&](int64_t t) { next = next < 0 ? t : std::min(next, t); };
  for (const auto& t : tasks_) take(t.at);
  for (const auto& [k, o] : outgoing_) take(o.next);
  if (int64_t h = hub_.NextDeadline(); h >= 0) take(h);
  return next;
}

void Server::Timers() {
  const int64_t now = SteadyMs();
  // Due tasks may schedule new ones: take them out first.
  std::vector<Task> due;
  for (auto it = tasks_.begin(); it != tasks_.end();) {
    if (it->at <= now) {
      due.push_back(std::move(*it));
      it = tasks_.erase(it);
    } else {
      ++it;
    }
  }
  std::stable_sort(due.begin(), due.end(),
                   [](const Task& a, const Task& b) { return a.at < b.at; });
  for (auto& t : due) t.fn();
  hub_.Tick(now);
  for (auto it = outgoing_.begin(); it != outgoing_.end();) {
    OutCon& o = it->second;
    if (o.next > now) {
      ++it;
      continue;
    }
    if (o.retries >= kMaxRetransmit) {
      Count("con_timeouts");
      Log("gave up on CON " + o.what + " to " + o.peer.key + " after " +
          std::to_string(kMaxRetransmit) + " retransmissions");
      const std::string peer_key = o.peer.key;
      const uint16_t mid =
          static_cast<uint16_t>(std::stoul(it->first.substr(it->first.rfind('#') + 1)));
      it = outgoing_.erase(it);
      hub_.OnConGiveUp(peer_key, mid);
      continue;
    }
    ++o.retries;
    o.timeout *= 2;
    o.next = now + o.timeout;
    Count("retransmissions");
    SendRaw(o.peer, o.bytes);
    ++it;
  }
  static int64_t last_sweep = 0;
  if (now - last_sweep > 10000) {  // §6.6: swept every 10 s
    last_sweep = now;
    for (auto it = exchanges_.begin(); it != exchanges_.end();)
      it = now - it->second.created > (it->second.con ? kConLifetimeMs : kNonLifetimeMs)
               ? exchanges_.erase(it)
               : std::next(it);
    for (auto it = blocks_.begin(); it != blocks_.end();)
      it = now - it->second.touched > kBlockLifetimeMs ? blocks_.erase(it) : std::next(it);
  }
}

// ---- control (stdin) --------------------------------------------------------------------------
void Server::OnStdin() {
  char buf[4096];
  ssize_t n = read(0, buf, sizeof buf);
  if (n <= 0) {
    // EOF on a pipe means the controlling test is gone: quit rather than linger as an orphan.
    // Any other stdin (/dev/null for a demo in the background) just stops being read.
    struct stat st {};
    if (fstat(0, &st) == 0 && S_ISFIFO(st.st_mode)) quit_ = true;
    stdin_open_ = false;
    return;
  }
  stdin_buf_.append(buf, static_cast<size_t>(n));
  size_t nl;
  while ((nl = stdin_buf_.find('\n')) != std::string::npos) {
    std::string line = stdin_buf_.substr(0, nl);
    stdin_buf_.erase(0, nl + 1);
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    std::string reply;
    try {
      reply = Control(line);
    } catch (const std::exception& e) {
      reply = std::string("error ") + e.what();
    }
    std::cout << reply << std::endl;
  }
}

std::string Server::Control(const std::string& line) {
  std::istringstream in(line);
  std::string cmd, a, b;
  in >> cmd >> a >> b;
  auto count = [](const std::string& s) -> std::optional<int64_t> {
    if (s.empty() ||
        !std::all_of(s.begin(), s.end(), [](unsigned char c) { return std::isdigit(c); }))
      return std::nullopt;
    int64_t v = 0;
    auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec != std::errc() || p != s.data() + s.size()) return std::nullopt;
    return v;
  };
  if (auto r = hub_.Control(cmd, line)) return *r;
  if (cmd == "drop") {
    auto n = count(a);
    if (!n) return "error usage: drop N";
    drop_n_ = *n;
  } else if (cmd == "drop-all") {
    if (a != "on" && a != "off") return "error usage: drop-all on|off";
    drop_all_ = a == "on";
  } else if (cmd == "fail") {
    auto n = count(a);
    auto c = ParseCode(b);
    if (!n || !c) return "error usage: fail N CODE";
    fail_n_ = *n;
    fail_code_ = *c;
  } else if (cmd == "fail-all") {
    if (a == "off") {
      fail_all_.reset();
    } else if (auto c = ParseCode(a)) {
      fail_all_ = *c;
    } else {
      return "error usage: fail-all CODE|off";
    }
  } else if (cmd == "lose-provision-reply") {
    auto n = count(a);
    if (!n) return "error usage: lose-provision-reply N";
    lose_provision_n_ = *n;
  } else if (cmd == "revoke") {
    auto it = tokens_.find(a);
    if (it == tokens_.end()) return "error unknown token";
    // §7: token deleted or changed -> observations get 2.02, later requests 4.01.
    hub_.EndDevice(it->second);
    devices_[it->second].token.clear();
    tokens_.erase(it);
    SaveState();
  } else if (cmd == "forget-x509") {
    // Every cached X.509 identity is gone, as after ThingsBoard's 24 h eviction or a NAT
    // rebinding (§6.2): token-less requests get 4.01 until a new handshake.
    identities_.ForgetAll();
    Log("forgot every cached X.509 identity");
  } else if (cmd == "revoke-x509") {
    // The device's X509_CERTIFICATE credential is removed (§7): its cached identities go, its
    // observations get 2.02, token-less requests 4.01. Persisted.
    auto d = devices_.find(a);
    if (d == devices_.end()) return "error unknown device";
    if (d->second.x509_der.empty()) return "error device has no certificate";
    hub_.EndDevice(a);
    DropCertificate(a);
    SaveState();
    Log("revoked the certificate of device " + a);
  } else if (cmd == "fault") {
    return faults_.Control(a, b);
  } else if (cmd == "delete") {
    // The operator deletes the device (§7): its observations get 2.02, its token 4.01 from now
    // on, and the name is free again (a new provisioning request may create it anew).
    auto d = devices_.find(a);
    if (d == devices_.end()) return "error unknown device";
    hub_.EndDevice(a);
    tokens_.erase(d->second.token);
    DropCertificate(a);
    devices_.erase(d);
    SaveState();
  } else if (cmd == "framing") {
    auto f = ParseFraming(a);
    if (!f) return "error usage: framing piggyback|separate|con-no-ack";
    opt_.framing = *f;
  } else if (cmd == "delay") {
    auto n = count(a);
    if (!n) return "error usage: delay MS";
    delay_ms_ = *n;
  } else if (cmd == "block2") {
    auto m = kBlock2Modes.find(a);
    if (m == kBlock2Modes.end()) return "error usage: block2 off|endless|huge-size2";
    block2_mode_ = m->second;
  } else if (cmd == "continue") {
    auto m = kContinueModes.find(a);
    if (m == kContinueModes.end())
      return "error usage: continue off|no-block1|last-block|wild-num|szx7";
    continue_mode_ = m->second;
  } else if (cmd == "set-shared") {
    // set-shared DEVICE {"key":value,...}: a shared-attribute change made on the server (§2.3).
    std::string rest;
    std::getline(in, rest);
    json j = json::parse(b + rest, nullptr, false);
    auto d = devices_.find(a);
    if (d == devices_.end()) return "error unknown device";
    if (j.is_discarded() || !j.is_object()) return "error usage: set-shared DEVICE JSON_OBJECT";
    for (auto it = j.begin(); it != j.end(); ++it) d->second.shared[it.key()] = it.value();
    SaveState();
    hub_.NotifyAttributes(a, j);
  } else if (cmd == "delete-shared") {
    // delete-shared DEVICE KEY...: shared attributes deleted on the server; the observer gets
    // {"deleted":[...]} (§2.3).
    auto d = devices_.find(a);
    if (d == devices_.end()) return "error unknown device";
    json deleted = json::array();
    for (std::string k = b; !k.empty(); k.clear(), in >> k) {
      d->second.shared.erase(k);
      deleted.push_back(k);
    }
    if (deleted.empty()) return "error usage: delete-shared DEVICE KEY...";
    SaveState();
    hub_.NotifyAttributes(a, json{{"deleted", deleted}});
  } else if (cmd == "stats") {
    json s = json::object();
    for (const auto& [k, v] : stats_) s[k] = v;
    s["devices"] = devices_.size();
    s["x509_cached"] = identities_.size();
    s["pending_con"] = outgoing_.size();
    s["framing"] = FramingName(opt_.framing);
    hub_.Stats(s);
    return s.dump();
  } else if (cmd == "quit") {
    quit_ = true;
  } else {
    return "error unknown command " + cmd;
  }
  return "ok";
}

// ---- state and record -------------------------------------------------------------------------
void Server::LoadState() {
  if (opt_.state_file.empty()) return;
  std::ifstream in(opt_.state_file);
  if (!in) return;
  std::stringstream ss;
  ss << in.rdbuf();
  json j = json::parse(ss.str(), nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    std::cerr << "tb-test-server: ignoring unreadable state file " << opt_.state_file << std::endl;
    return;
  }
  if (j.contains("devices") && j["devices"].is_object()) {
    for (auto it = j["devices"].begin(); it != j["devices"].end(); ++it) {
      const json& d = it.value();
      Device dev;
      // A revoked device is saved with a null token.
      if (d.contains("token") && d["token"].is_string()) dev.token = d["token"].get<std::string>();
      dev.provisioned = d.value("provisioned", false);
      if (d.contains("client") && d["client"].is_object()) dev.client = d["client"];
      if (d.contains("shared") && d["shared"].is_object()) dev.shared = d["shared"];
      if (!dev.token.empty()) tokens_[dev.token] = it.key();
      devices_[it.key()] = dev;
      if (d.contains("x509") && d["x509"].is_string()) {
        const std::string pem = d["x509"].get<std::string>();
        if (auto der = CertDerFromPem(pem)) SetCertificate(it.key(), pem, *der);
      }
    }
  }
}

void Server::SaveState() {
  if (opt_.state_file.empty()) return;
  json j;
  j["devices"] = json::object();
  for (const auto& [name, d] : devices_) {
    j["devices"][name] = {{"token", d.token.empty() ? json(nullptr) : json(d.token)},
                          {"x509", d.x509_pem.empty() ? json(nullptr) : json(d.x509_pem)},
                          {"provisioned", d.provisioned},
                          {"client", d.client},
                          {"shared", d.shared}};
  }
  // Atomic rewrite: a reader (the Python helper) never sees a half-written file.
  std::string tmp = opt_.state_file + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << j.dump(-1, ' ', false, json::error_handler_t::replace) << "\n";
    if (!out) {
      std::cerr << "tb-test-server: cannot write " << tmp << std::endl;
      return;
    }
  }
  std::rename(tmp.c_str(), opt_.state_file.c_str());
}

void Server::Record(const ordered_json& rec) {
  if (!record_.is_open()) return;
  // Payloads may be arbitrary bytes: invalid UTF-8 is replaced rather than thrown on.
  // One write per line: readers (tbserver.py) poll this file and must never see half a record.
  std::string line = rec.dump(-1, ' ', false, json::error_handler_t::replace);
  line += '\n';
  record_.write(line.data(), static_cast<std::streamsize>(line.size()));
  record_.flush();
}

// ---- CLI --------------------------------------------------------------------------------------
void Usage() {
  std::cerr
      << "usage: tb-test-server [--port N] [--bind ADDR] [--state FILE] [--record FILE]\n"
         "         [--provision-key K --provision-secret S] [--strategy "
         "allow_create|pre_provisioned]\n"
         "         [--device NAME=TOKEN]... [--device-x509 NAME=PEMFILE]...\n"
         "         [--framing con-no-ack|separate|piggyback]\n"
         "         [--strict-size] [--quiet|--verbose]\n"
         "A ThingsBoard-compatible CoAP server for tests and demos; see docs/test-server.md.\n";
}

std::optional<Options> ParseArgs(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto val = [&]() -> std::optional<std::string> {
      if (i + 1 >= argc) return std::nullopt;
      return std::string(argv[++i]);
    };
    std::optional<std::string> v;
    if (a == "--help" || a == "-h") {
      Usage();
      std::exit(0);
    } else if (a == "--quiet") {
      o.verbosity = 0;
    } else if (a == "--verbose") {
      o.verbosity = 2;
    } else if (a == "--strict-size") {
      o.strict_size = true;
    } else if (!(v = val())) {
      std::cerr << "tb-test-server: " << a << " needs a value (or is unknown)\n";
      return std::nullopt;
    } else if (a == "--port") {
      char* end = nullptr;
      long p = std::strtol(v->c_str(), &end, 10);
      if (*end || p < 0 || p > 65535) return std::nullopt;
      o.port = static_cast<int>(p);
    } else if (a == "--bind") {
      o.bind = *v;
    } else if (a == "--state") {
      o.state_file = *v;
    } else if (a == "--record") {
      o.record_file = *v;
    } else if (a == "--provision-key") {
      o.provision_key = *v;
    } else if (a == "--provision-secret") {
      o.provision_secret = *v;
    } else if (a == "--strategy") {
      if (*v != "allow_create" && *v != "pre_provisioned") return std::nullopt;
      o.pre_provisioned = *v == "pre_provisioned";
    } else if (a == "--framing") {
      auto f = ParseFraming(*v);
      if (!f) return std::nullopt;
      o.framing = *f;
    } else if (a == "--device") {
      auto eq = v->find('=');
      if (eq == std::string::npos || eq == 0 || eq + 1 == v->size()) return std::nullopt;
      o.devices.emplace_back(v->substr(0, eq), v->substr(eq + 1));
    } else if (a == "--device-x509") {
      auto eq = v->find('=');
      if (eq == std::string::npos || eq == 0 || eq + 1 == v->size()) return std::nullopt;
      o.x509_devices.emplace_back(v->substr(0, eq), v->substr(eq + 1));
    } else {
      std::cerr << "tb-test-server: unknown option " << a << "\n";
      return std::nullopt;
    }
  }
  return o;
}

}  // namespace
}  // namespace tbserver

int main(int argc, char** argv) {
  try {
    auto opts = tbserver::ParseArgs(argc, argv);
    if (!opts) {
      tbserver::Usage();
      return 2;
    }
    coap_startup();
    coap_set_log_level(LOG_EMERG);
    std::signal(SIGTERM, tbserver::OnSignal);
    std::signal(SIGINT, tbserver::OnSignal);
    std::signal(SIGPIPE, SIG_IGN);
    tbserver::Server server(std::move(*opts));
    if (!server.Init()) return 1;
    int rc = server.Run();
    coap_cleanup();
    return rc;
  } catch (const std::exception& e) {
    std::cerr << "tb-test-server: fatal: " << e.what() << std::endl;
    return 1;
  }
}
