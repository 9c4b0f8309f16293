// Observations and server-side RPC of tb-test-server, with ThingsBoard's rules
// (docs/thingsboard-coap.md §2.3, §3.1, §7; docs/test-server.md "Observe and RPC"):
//  - one subscription of each kind per device: a newer registration ends the older with 2.02;
//  - notifications copy the registration's type; while a CON notification is un-ACKed, newer
//    ones are not queued: only the freshest is kept (Californium ObserveLayer), so an attribute
//    update or an RPC can be lost;
//  - an RPC is DELIVERED when its CON notification is ACKed (at once for NON), TIMEOUT without
//    an ACK within min(10 s, time to expiry), SUCCESSFUL on a reply, EXPIRED when its timeout is
//    up; pending RPCs are sent again on every RPC re-registration;
//  - ids count from 0 per device and start again from 0 when the device's actor restarts
//    (control "actor-restart", or a server restart: this state lives in memory only).
// The hub knows nothing of sockets: main.cpp hands it a sender per registration and tells it
// of ACKs, RSTs and CON give-ups.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "wire.h"

namespace tbserver {

class ObserveHub {
 public:
  // Sends a notification (type, MID set by the sender: CON or NON as asked); returns the MID.
  using Sender = std::function<uint16_t(Message m, bool con, const std::string& what)>;

  explicit ObserveHub(std::function<void(const std::string&)> log) : log_(std::move(log)) {}

  // GET Observe=0 on attributes (rpc=false) or rpc. Ends the device's older subscription of
  // that kind with 2.02 (unless it is the same token from the same peer: a duplicate that TB
  // ignores). RPC: pending requests are sent again right after the 2.03.
  void Register(const std::string& dev, bool rpc, const std::string& peer_key,
                const std::string& token, bool con, std::optional<uint32_t> cf, Sender send);
  // GET Observe=1: the device's subscription of that kind ends (no answer, §2.3).
  void Deregister(const std::string& dev, bool rpc);
  // Shared attributes changed (or were deleted: {"deleted":[...]}): notify the attribute
  // observer, if any.
  void NotifyAttributes(const std::string& dev, const nlohmann::json& changed);
  // The token was revoked or the device deleted (§7): both observations get 2.02 (no Observe).
  void EndDevice(const std::string& dev);
  // POST rpc/{id}. Always 2.01 (§3.1); a reply to an unknown, finished or expired id is ignored.
  void OnRpcReply(const std::string& dev, int64_t id, const nlohmann::json& body);
  void OnAck(const std::string& peer_key, uint16_t mid);
  // RST to a notification cancels that observation (§2.3).
  void OnRst(const std::string& peer_key, uint16_t mid);
  // A CON notification got no ACK after all retransmissions: Californium cancels every
  // observation of that peer (§7).
  void OnConGiveUp(const std::string& peer_key, uint16_t mid);
  void Tick(int64_t now_ms);
  int64_t NextDeadline() const;  // -1 = none
  // Control commands of the hub (docs/test-server.md); nullopt when `cmd` is not one.
  std::optional<std::string> Control(const std::string& cmd, const std::string& line);
  void Stats(nlohmann::json& out) const;

 private:
  struct Observation {
    std::string peer_key;
    std::string token;
    bool con = true;
    std::optional<uint32_t> cf;
    uint32_t seq = 0;
    Sender send;
    std::optional<uint16_t> inflight_mid;  // un-ACKed CON notification
    std::optional<int64_t> inflight_rpc;   // the RPC it carries (index into rpcs)
    std::optional<std::string> pending;    // freshest payload waiting for the ACK
    std::optional<int64_t> pending_rpc;
  };
  struct Rpc {
    int64_t id = 0;
    std::string method;
    nlohmann::json params;
    int64_t created = 0, expires = 0, ack_deadline = 0;
    std::string state = "QUEUED";  // QUEUED SENT DELIVERED TIMEOUT SUCCESSFUL EXPIRED
    nlohmann::json response;
    bool finished() const { return state == "SUCCESSFUL" || state == "EXPIRED"; }
  };
  struct DeviceState {
    std::optional<Observation> attributes, rpc;
    int64_t next_id = 0;
    std::vector<Rpc> rpcs;  // every RPC since the server started, in order (ids may repeat)
    bool resend_due = false;
  };

  void Send(const std::string& dev, Observation& o, std::string payload,
            std::optional<int64_t> rpc_index);
  void Transmit(const std::string& dev, Observation& o, const std::string& payload,
                std::optional<int64_t> rpc_index);
  void SendDeleted(Observation& o, bool with_observe, const std::string& what);
  void SendRpc(const std::string& dev, int64_t index);
  void Count(const std::string& k) { ++stats_[k]; }
  static int64_t Now();

  std::function<void(const std::string&)> log_;
  std::map<std::string, DeviceState> devices_;
  std::map<std::string, int64_t> stats_;
};

}  // namespace tbserver
