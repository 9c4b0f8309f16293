// tb-test-server: observations and server-side RPC. See observe.h and docs/test-server.md.
#include "observe.h"

#include <algorithm>
#include <chrono>
#include <sstream>

namespace tbserver {

using json = nlohmann::json;

namespace {

constexpr uint8_t kContent = Code(2, 5);
constexpr uint8_t kDeleted = Code(2, 2);
// §3.1 "Delivery bookkeeping": without an ACK within min(window, time to expiry) the RPC is
// TIMEOUT; the window (pagingTransmissionWindow / psmActivityTimer) defaults to 10 000 ms.
constexpr int64_t kRpcAckWindowMs = 10000;

std::string Hex(const std::string& s) {
  static const char* d = "0123456789abcdef";
  std::string out;
  for (unsigned char c : s) {
    out += d[c >> 4];
    out += d[c & 15];
  }
  return out;
}

}  // namespace

int64_t ObserveHub::Now() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void ObserveHub::Register(const std::string& dev, bool rpc, const std::string& peer_key,
                          const std::string& token, bool con, std::optional<uint32_t> cf,
                          Sender send) {
  DeviceState& d = devices_[dev];
  auto& slot = rpc ? d.rpc : d.attributes;
  if (slot && slot->token == token && slot->peer_key == peer_key) {
    // §2.3: the same token again is a duplicate TB ignores; the answer is sent all the same.
    Count("observe_duplicate");
    return;
  }
  if (slot) {
    // §2.3/§3.1: one subscription per device; the old one gets 2.02 Deleted.
    SendDeleted(*slot, /*with_observe=*/true, "2.02 to replaced observer");
    Count("observe_replaced");
  }
  Observation o;
  o.peer_key = peer_key;
  o.token = token;
  o.con = con;
  o.cf = cf;
  o.send = std::move(send);
  slot = std::move(o);
  Count(rpc ? "observe_rpc" : "observe_attributes");
  // Pending RPCs go out again after the 2.03 (ThingsBoard re-sends them on every subscription).
  if (rpc) d.resend_due = true;
}

void ObserveHub::Deregister(const std::string& dev, bool rpc) {
  auto it = devices_.find(dev);
  if (it == devices_.end()) return;
  (rpc ? it->second.rpc : it->second.attributes).reset();
}

void ObserveHub::SendDeleted(Observation& o, bool with_observe, const std::string& what) {
  Message m;
  m.code = kDeleted;
  m.token = o.token;
  if (with_observe) m.AddUint(kOptObserve, o.seq);
  o.send(m, o.con, what);
}

void ObserveHub::EndDevice(const std::string& dev) {
  auto it = devices_.find(dev);
  if (it == devices_.end()) return;
  for (auto* slot : {&it->second.attributes, &it->second.rpc}) {
    if (!*slot) continue;
    SendDeleted(**slot, /*with_observe=*/false, "2.02 after revoke");
    slot->reset();
  }
}

void ObserveHub::NotifyAttributes(const std::string& dev, const json& changed) {
  auto it = devices_.find(dev);
  if (it == devices_.end() || !it->second.attributes) return;
  Send(dev, *it->second.attributes, changed.dump(), std::nullopt);
}

// Sends now, or, while a CON notification is un-ACKed, keeps only this freshest one (§2.3
// "Lost notifications"; §3.1 "the replaced RPC is never sent and later times out").
void ObserveHub::Send(const std::string& dev, Observation& o, std::string payload,
                      std::optional<int64_t> rpc_index) {
  if (o.con && o.inflight_mid) {
    if (o.pending) Count("notifications_coalesced");
    o.pending = std::move(payload);
    o.pending_rpc = rpc_index;
    return;
  }
  Transmit(dev, o, payload, rpc_index);
}

void ObserveHub::Transmit(const std::string& dev, Observation& o, const std::string& payload,
                          std::optional<int64_t> rpc_index) {
  Message m;
  m.code = kContent;  // §2.3/§3.1: 2.05, Observe 1, 2, 3, ...
  m.token = o.token;
  m.AddUint(kOptObserve, ++o.seq);
  m.AddUint(kOptContentFormat, o.cf.value_or(50));
  m.payload = payload;
  const uint16_t mid = o.send(m, o.con, rpc_index ? "RPC notification" : "attribute notification");
  Count("notifications");
  if (o.con) {
    o.inflight_mid = mid;
    o.inflight_rpc = rpc_index;
  } else if (rpc_index) {
    // §3.1: a NON notification marks the RPC DELIVERED as soon as it is sent.
    Rpc& r = devices_[dev].rpcs[static_cast<size_t>(*rpc_index)];
    if (!r.finished()) r.state = "DELIVERED";
  }
}

void ObserveHub::SendRpc(const std::string& dev, int64_t index) {
  DeviceState& d = devices_[dev];
  Rpc& r = d.rpcs[static_cast<size_t>(index)];
  if (!d.rpc || r.finished()) return;
  const int64_t now = Now();
  r.state = "SENT";
  r.ack_deadline = now + std::min(kRpcAckWindowMs, std::max<int64_t>(0, r.expires - now));
  json body = {{"id", r.id}, {"method", r.method}, {"params", r.params}};  // §3.1: id a number
  Send(dev, *d.rpc, body.dump(), index);
}

void ObserveHub::OnRpcReply(const std::string& dev, int64_t id, const json& body) {
  auto it = devices_.find(dev);
  if (it != devices_.end()) {
    // The newest unfinished RPC with that id (ids repeat after an actor restart).
    auto& rpcs = it->second.rpcs;
    for (auto r = rpcs.rbegin(); r != rpcs.rend(); ++r) {
      if (r->id != id || r->finished()) continue;
      r->state = "SUCCESSFUL";
      r->response = body;
      Count("rpc_replies");
      log_("RPC " + std::to_string(id) + " (" + r->method + ") answered by " + dev);
      return;
    }
  }
  Count("rpc_replies_ignored");  // §3.1: still 2.01, ignored by the core
  log_("reply to unknown or finished RPC " + std::to_string(id) + " from " + dev + " ignored");
}

void ObserveHub::OnAck(const std::string& peer_key, uint16_t mid) {
  for (auto& [dev, d] : devices_) {
    for (auto* slot : {&d.attributes, &d.rpc}) {
      if (!*slot) continue;
      Observation& o = **slot;
      if (o.peer_key != peer_key || o.inflight_mid != mid) continue;
      if (o.inflight_rpc) {
        Rpc& r = d.rpcs[static_cast<size_t>(*o.inflight_rpc)];
        if (!r.finished() && r.state != "TIMEOUT") r.state = "DELIVERED";  // §3.1
      }
      o.inflight_mid.reset();
      o.inflight_rpc.reset();
      if (o.pending) {
        std::string payload = std::move(*o.pending);
        auto rpc_index = o.pending_rpc;
        o.pending.reset();
        o.pending_rpc.reset();
        Transmit(dev, o, payload, rpc_index);
      }
      return;
    }
  }
}

void ObserveHub::OnRst(const std::string& peer_key, uint16_t mid) {
  for (auto& [dev, d] : devices_) {
    for (auto* slot : {&d.attributes, &d.rpc}) {
      if (*slot && (*slot)->peer_key == peer_key && (*slot)->inflight_mid == mid) {
        Count("observe_reset");
        log_("device " + dev + " reset a notification: observation canceled");
        slot->reset();
      }
    }
  }
}

void ObserveHub::OnConGiveUp(const std::string& peer_key, uint16_t mid) {
  bool ours = false;
  for (auto& [dev, d] : devices_)
    for (auto* slot : {&d.attributes, &d.rpc})
      if (*slot && (*slot)->peer_key == peer_key && (*slot)->inflight_mid == mid) ours = true;
  if (!ours) return;
  // §7: Californium cancels all of that peer's observations; TB drops the session.
  for (auto& [dev, d] : devices_) {
    for (auto* slot : {&d.attributes, &d.rpc}) {
      if (*slot && (*slot)->peer_key == peer_key) {
        Count("observe_given_up");
        log_("notification to " + peer_key + " never ACKed: observations of " + dev + " canceled");
        slot->reset();
      }
    }
  }
}

void ObserveHub::Tick(int64_t now) {
  for (auto& [dev, d] : devices_) {
    for (auto& r : d.rpcs) {
      if (r.finished()) continue;
      if (now >= r.expires) {
        r.state = "EXPIRED";
        Count("rpc_expired");
        log_("RPC " + std::to_string(r.id) + " (" + r.method + ") to " + dev + " expired");
      } else if (r.state == "SENT" && now >= r.ack_deadline) {
        r.state = "TIMEOUT";
        Count("rpc_timeouts");
      }
    }
    if (d.resend_due) {
      d.resend_due = false;
      for (size_t i = 0; i < d.rpcs.size(); ++i) {
        if (!d.rpcs[i].finished()) SendRpc(dev, static_cast<int64_t>(i));
      }
    }
  }
}

int64_t ObserveHub::NextDeadline() const {
  int64_t next = -1;
  auto take = [&](int64_t t) { next = next < 0 ? t : std::min(next, t); };
  for (const auto& [dev, d] : devices_) {
    if (d.resend_due) take(Now());
    for (const auto& r : d.rpcs) {
      if (r.finished()) continue;
      take(r.expires);
      if (r.state == "SENT") take(r.ack_deadline);
    }
  }
  return next;
}

std::optional<std::string> ObserveHub::Control(const std::string& cmd, const std::string& line) {
  std::istringstream in(line);
  std::string skip, dev;
  in >> skip >> dev;
  if (cmd == "rpc") {
    // rpc DEVICE METHOD TIMEOUT_MS [PARAMS_JSON]: a server-side RPC (§3.1), as a dashboard
    // sends it; replies "ok ID".
    std::string method, timeout, rest;
    in >> method >> timeout;
    std::getline(in, rest);
    char* end = nullptr;
    const long long ms = std::strtoll(timeout.c_str(), &end, 10);
    if (dev.empty() || method.empty() || timeout.empty() || *end || ms <= 0)
      return "error usage: rpc DEVICE METHOD TIMEOUT_MS [PARAMS_JSON]";
    json params = nullptr;
    if (rest.find_first_not_of(' ') != std::string::npos) {
      params = json::parse(rest, nullptr, false);
      if (params.is_discarded()) return "error PARAMS_JSON is not JSON";
    }
    DeviceState& d = devices_[dev];
    Rpc r;
    r.id = d.next_id++;
    r.method = method;
    r.params = params;
    r.created = Now();
    r.expires = r.created + ms;
    d.rpcs.push_back(std::move(r));
    Count("rpcs");
    log_("RPC " + std::to_string(d.rpcs.back().id) + " (" + method + ") to " + dev +
         (d.rpc ? "" : ", queued: no RPC observer"));
    SendRpc(dev, static_cast<int64_t>(d.rpcs.size() - 1));
    return "ok " + std::to_string(d.rpcs.back().id);
  }
  if (cmd == "rpcs") {
    // rpcs DEVICE: every RPC of the device as a JSON array.
    json out = json::array();
    auto it = devices_.find(dev);
    if (it != devices_.end()) {
      for (const auto& r : it->second.rpcs)
        out.push_back({{"id", r.id},
                       {"method", r.method},
                       {"params", r.params},
                       {"state", r.state},
                       {"response", r.response}});
    }
    return out.dump();
  }
  if (cmd == "observers") {
    // observers DEVICE: {"attributes": {...}|null, "rpc": {...}|null}.
    json out = {{"attributes", nullptr}, {"rpc", nullptr}};
    auto it = devices_.find(dev);
    if (it != devices_.end()) {
      for (auto [name, slot] :
           {std::pair{"attributes", &it->second.attributes}, std::pair{"rpc", &it->second.rpc}}) {
        if (!*slot) continue;
        out[name] = {{"peer", (*slot)->peer_key},
                     {"token", Hex((*slot)->token)},
                     {"con", (*slot)->con},
                     {"seq", (*slot)->seq},
                     {"unacked", (*slot)->inflight_mid.has_value()}};
      }
    }
    return out.dump();
  }
  if (cmd == "actor-restart") {
    // actor-restart DEVICE: the device's actor restarts: pending RPCs are lost (their callers
    // time out) and ids start again from 0.
    DeviceState& d = devices_[dev];
    for (auto& r : d.rpcs)
      if (!r.finished()) r.state = "EXPIRED";
    d.next_id = 0;
    return "ok";
  }
  if (cmd == "end-observe") {
    // end-observe DEVICE attributes|rpc: the server ends the observation with 2.02, as when a
    // newer registration came from elsewhere (§2.3).
    std::string kind;
    in >> kind;
    if (kind != "attributes" && kind != "rpc") return "error usage: end-observe DEVICE KIND";
    auto it = devices_.find(dev);
    if (it == devices_.end()) return "ok";
    auto& slot = kind == "rpc" ? it->second.rpc : it->second.attributes;
    if (slot) {
      SendDeleted(*slot, /*with_observe=*/true, "2.02 on end-observe");
      slot.reset();
    }
    return "ok";
  }
  return std::nullopt;
}

void ObserveHub::Stats(json& out) const {
  for (const auto& [k, v] : stats_) out[k] = v;
}

}  // namespace tbserver
