// The downlink side of the agent, wired (docs/attributes.md): one coap::Observer,
// the attribute exchange (attributes::Sync) and server-side RPC (rpc::Server), plus what
// `remote:` lets shared attributes change. Kept out of manager.cpp: the manager only creates it
// once it has a token, lets it overlay remote settings on a reloaded config, and reads its
// status.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>

#include <nlohmann/json.hpp>

#include "attributes/sync.hpp"
#include "coap/observer.hpp"
#include "config/config.hpp"
#include "rpc/server.hpp"
#include "util/timer.hpp"

namespace tb::daemon {

struct DownlinkHooks {
  // Applies a whole config (the file's plus remote settings) as a reload does; "" or why not.
  std::function<std::string(const config::Config&)> apply;
  // Re-reads the config file (RPC reload); "" or every problem.
  std::function<std::string()> reload;
  std::function<void()> flush;
  // getStatus: the status as `tb-agent status --json` prints it.
  std::function<nlohmann::json()> status;
  std::function<void()> changed;  // something shown on D-Bus changed
};

class Downlink {
 public:
  // Fails (nullptr, *error) only when the loop refuses a source.
  static std::unique_ptr<Downlink> create(sd_event* loop, coap::Client& client,
                                          const config::Config& file_config,
                                          const std::string& token, DownlinkHooks hooks,
                                          std::string* error);
  ~Downlink();

  void start();
  // The config file was (re)read: `file_config` is what it says, before remote settings.
  void file_config_changed(const config::Config& file_config);
  // `file_config` with the remote settings in force laid over it.
  config::Config with_remote_settings(const config::Config& file_config) const;
  // The whole config as it runs now (file + remote) was applied: publish the facts again.
  void applied(const config::Config& running);
  // The network or the server may have changed (deliveries work again after failing): register
  // both observations again now with fresh tokens, and resync the shared attributes.
  void renew();

  std::string attributes_observation() const { return sync_->observation_state(); }
  std::string rpc_observation() const { return rpc_->observation_state(); }
  std::string last_rpc() const { return rpc_->last_rpc(); }
  // "applied host_interval=10s", "refused agent_mode: not allowed by remote:", …
  const std::string& last_remote_change() const { return last_remote_; }

 private:
  Downlink(sd_event* loop, config::Config file_config, DownlinkHooks hooks);
  void on_shared(const attributes::SharedUpdate& u, bool full);
  void publish_facts();
  bool builtin(const rpc::Request& r, std::function<void(nlohmann::json)> reply);
  void report(const std::string& text, bool refused);

  sd_event* loop_;
  config::Config file_config_;
  config::Config running_;
  DownlinkHooks hooks_;
  std::unique_ptr<coap::Observer> observer_;
  std::unique_ptr<attributes::Sync> sync_;
  std::unique_ptr<rpc::Server> rpc_;
  // Remote settings in force: setting -> (shared attribute key, value).
  std::map<std::string, std::pair<std::string, nlohmann::json>> remote_;
  std::set<std::string> reported_not_allowed_;
  std::string last_remote_;
  Timer facts_timer_;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

}  // namespace tb::daemon
