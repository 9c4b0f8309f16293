#include "daemon/downlink.hpp"

#include "daemon/manager.hpp"

#include <spdlog/spdlog.h>

#include <utility>

#include "attributes/facts.hpp"

namespace tb::daemon {

using nlohmann::json;

namespace {

// IP addresses come and go: the facts are read again this often, and only a change is sent.
constexpr Millis kFactsInterval{60'000};

std::string shown(const json& v) {
  std::string s = v.dump(-1, ' ', false, json::error_handler_t::replace);
  return s.size() > 64 ? s.substr(0, 61) + "..." : s;
}

// Runs `fn` once from the loop, from a source the loop owns (floating).
void run_soon(sd_event* loop, std::function<void()> fn) {
  auto* heap = new std::function<void()>(std::move(fn));
  sd_event_source* s = nullptr;
  const int r = sd_event_add_defer(
      loop, &s,
      [](sd_event_source* src, void* u) -> int {
        auto* f = static_cast<std::function<void()>*>(u);
        try {
          (*f)();
        } catch (const std::exception& e) {
          spdlog::error("RPC reload failed: {}", e.what());
        } catch (...) {
        }
        delete f;
        sd_event_source_disable_unref(src);  // the loop's (floating) reference
        return 0;
      },
      heap);
  if (r < 0) {
    delete heap;
    return;
  }
  sd_event_source_set_floating(s, 1);
  sd_event_source_unref(s);
}

}  // namespace

Downlink::Downlink(sd_event* loop, config::Config file_config, DownlinkHooks hooks)
    : loop_(loop),
      file_config_(std::move(file_config)),
      running_(file_config_),
      hooks_(std::move(hooks)),
      facts_timer_(
          loop, [this] { publish_facts(); }, Millis(5000)) {}

std::unique_ptr<Downlink> Downlink::create(sd_event* loop, coap::Client& client,
                                           const config::Config& file_config,
                                           const std::string& token, DownlinkHooks hooks,
                                           std::string* error) {
  std::unique_ptr<Downlink> d(new Downlink(loop, file_config, std::move(hooks)));
  coap::ObserverOptions oo;
  oo.register_timeout = file_config.server.request_timeout;
  // With server.dtls the observations are DTLS too: nothing goes to the server in the clear.
  oo.dtls = client_options(file_config.server).dtls;
  d->observer_ =
      coap::Observer::create(loop, {file_config.server.host, file_config.server.port}, oo, error);
  if (!d->observer_) return nullptr;
  Downlink* self = d.get();
  d->sync_ = std::make_unique<attributes::Sync>(
      loop, client, *d->observer_,
      attributes::SyncOptions{token, file_config.downlink.reregister_interval},
      [self](const attributes::SharedUpdate& u, bool full) { self->on_shared(u, full); },
      [self] {
        if (self->hooks_.changed) self->hooks_.changed();
      });
  d->rpc_ = std::make_unique<rpc::Server>(
      loop, client, *d->observer_,
      rpc::ServerOptions{token, file_config.downlink.reregister_interval, file_config.downlink.rpc},
      [self](const rpc::Request& r, std::function<void(json)> reply) {
        return self->builtin(r, std::move(reply));
      },
      [self] {
        if (self->hooks_.changed) self->hooks_.changed();
      });
  return d;
}

Downlink::~Downlink() { *alive_ = false; }

void Downlink::start() {
  publish_facts();
  sync_->start();
  rpc_->start();
}

void Downlink::publish_facts() {
  sync_->publish(attributes::client_attributes(
      attributes::collect_facts(running_, TB_AGENT_VERSION), running_.downlink.attributes));
  facts_timer_.arm_in(kFactsInterval);
}

void Downlink::file_config_changed(const config::Config& file_config) {
  file_config_ = file_config;
  rpc_->set_methods(file_config.downlink.rpc);
}

config::Config Downlink::with_remote_settings(const config::Config& file_config) const {
  config::Config out = file_config;
  for (const auto& [setting, kv] : remote_) {
    // A setting the file no longer allows, or that no longer fits, is dropped silently here;
    // on_shared reports refusals when values arrive.
    bool allowed = false;
    for (const auto& [key, s] : file_config.downlink.remote) allowed = allowed || s == setting;
    if (allowed) attributes::apply_setting(out, setting, kv.second);
  }
  return out;
}

void Downlink::applied(const config::Config& running) {
  running_ = running;
  publish_facts();
}

void Downlink::renew() {
  spdlog::info("deliveries work again: registering the observations again");
  sync_->renew();
  rpc_->renew();
}

void Downlink::report(const std::string& text, bool refused) {
  last_remote_ = text;
  if (refused) {
    spdlog::warn("shared attributes: {}", text);
  } else {
    spdlog::info("shared attributes: {}", text);
  }
  if (hooks_.changed) hooks_.changed();
}

void Downlink::on_shared(const attributes::SharedUpdate& u, bool full) {
  const auto& allowed = file_config_.downlink.remote;  // key -> setting
  auto next = remote_;
  std::vector<std::string> applied_text;
  for (const auto& [key, value] : u.values) {
    auto a = allowed.find(key);
    if (a == allowed.end()) {
      // Reported once per key for a full state (every unrelated shared attribute is in it),
      // every time for a change.
      if (!full || reported_not_allowed_.insert(key).second)
        report("refused " + key + "=" + shown(value) + ": not allowed by remote:", true);
      continue;
    }
    config::Config probe = file_config_;
    const std::string why = attributes::apply_setting(probe, a->second, value);
    if (!why.empty()) {
      report("refused " + key + "=" + shown(value) + " (" + a->second + "): " + why, true);
      continue;
    }
    auto cur = next.find(a->second);
    if (cur != next.end() && cur->second.second == value) continue;
    next[a->second] = {key, value};
    applied_text.push_back(key + "=" + shown(value));
  }
  auto remove = [&](const std::string& key) {
    auto a = allowed.find(key);
    if (a == allowed.end()) return;
    if (next.erase(a->second)) applied_text.push_back(key + " deleted (back to the file's value)");
  };
  for (const auto& key : u.deleted) remove(key);
  if (full) {
    for (const auto& [key, setting] : allowed)
      if (!u.values.count(key)) remove(key);
  }
  if (next == remote_) return;
  auto previous = std::move(remote_);
  remote_ = std::move(next);
  const std::string problems = hooks_.apply ? hooks_.apply(with_remote_settings(file_config_)) : "";
  std::string text;
  for (const auto& t : applied_text) text += (text.empty() ? "" : ", ") + t;
  if (!problems.empty()) {
    remote_ = std::move(previous);
    report("refused " + text + ": " + problems, true);
    return;
  }
  running_ = with_remote_settings(file_config_);
  report("applied " + text, false);
  publish_facts();  // a source's interval is one of the facts
}

bool Downlink::builtin(const rpc::Request& r, std::function<void(json)> reply) {
  if (r.method == "getStatus") {
    reply(hooks_.status ? hooks_.status() : json::object());
    return true;
  }
  if (r.method == "flush") {
    if (hooks_.flush) hooks_.flush();
    reply(json{{"result", "flushing"}});
    return true;
  }
  if (r.method == "reload") {
    // Not from inside the RPC handler, and not from a source this object owns: a reload may
    // replace the Downlink itself (a new token or server). The reply goes only if it survived.
    auto alive = alive_;
    run_soon(loop_, [this, alive, reply = std::move(reply)] {
      if (!*alive) return;
      const std::string problems = hooks_.reload ? hooks_.reload() : "";
      if (*alive)
        reply(problems.empty() ? json{{"result", "reloaded"}} : json{{"error", problems}});
    });
    return true;
  }
  return false;
}

}  // namespace tb::daemon
