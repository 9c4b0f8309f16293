// Server-side RPC (docs/attributes.md; docs/thingsboard-coap.md §3.1): observes /api/v1/{token}/rpc
// (kept alive by coap::Subscription), answers every request with a JSON object at
// /api/v1/{token}/rpc/{id}: built-in methods through `builtin`, the config's `rpc:` methods by
// running their command, anything else with an error. Nothing runs that the config does not
// name.
//
// De-duplication: ThingsBoard sends a pending request again on every re-registration, and
// restarts ids from 0 when the device's actor restarts. A request is identified by (id, method,
// params). While one is running, the same request again is ignored (its reply follows); once it
// is done, the same request again gets the same reply again without running — until the server
// has acknowledged the reply (2.01): after that ThingsBoard never sends that request again
// (it is SUCCESSFUL), so the same (id, method, params) is a new request after an id restart, and
// runs.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "coap/client.hpp"
#include "coap/subscription.hpp"
#include "config/config.hpp"
#include "rpc/codec.hpp"
#include "rpc/runner.hpp"

namespace tb::rpc {

struct ServerOptions {
  std::string token;
  Millis reregister_interval = std::chrono::minutes(2);
  std::map<std::string, config::RpcMethodConfig> methods;
};

// A built-in method: calls reply exactly once with a JSON object; false when `method` is not
// built in.
using Builtin = std::function<bool(const Request&, std::function<void(nlohmann::json)> reply)>;

class Server {
 public:
  static constexpr std::size_t kMaxRunning = 4;
  static constexpr std::size_t kMaxRemembered = 64;

  Server(sd_event* loop, coap::Client& client, coap::Observer& observer, ServerOptions options,
         Builtin builtin, std::function<void()> on_state);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  void start();
  void renew();
  // A reload: the methods a request may run from now on.
  void set_methods(std::map<std::string, config::RpcMethodConfig> methods);

  const std::string& observation_state() const { return subscription_.state(); }
  // "restart_modem (id 3): ok" — the last request and how it ended; "" = none yet.
  const std::string& last_rpc() const { return last_rpc_; }
  // Commands started since start (tests, logs).
  std::uint64_t commands_run() const { return commands_run_; }

 private:
  struct Entry {
    Request request;
    bool running = true;
    bool confirmed = false;  // the server acknowledged our reply
    std::string reply;
    int attempts = 0;
  };

  void on_notification(const coap::Notification& n);
  void handle(const Request& r);
  void finish(const std::string& key, const std::string& reply, const std::string& outcome);
  void send_reply(const std::string& key);
  void forget_old();

  sd_event* loop_;
  coap::Client& client_;
  ServerOptions options_;
  Builtin builtin_;
  std::function<void()> on_state_;
  coap::Subscription subscription_;
  std::map<std::string, Entry> entries_;
  std::deque<std::string> order_;  // keys, oldest first
  std::map<std::string, std::unique_ptr<CommandRunner>> running_;
  std::string last_rpc_;
  std::uint64_t commands_run_ = 0;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

}  // namespace tb::rpc
