#include "rpc/server.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <utility>

#include "credentials/credentials.hpp"
#include "util/units.hpp"
#include "util/utf8.hpp"

namespace tb::rpc {

using nlohmann::json;

namespace {

constexpr int kMaxReplyAttempts = 3;

std::string command_outcome(const CommandResult& r, Millis timeout, json* reply) {
  json out = json::object();
  // Output goes into JSON: invalid UTF-8 becomes U+FFFD rather than failing the reply.
  out["output"] = utf8::sanitized(r.output);
  if (r.truncated) out["truncated"] = true;
  std::string outcome;
  if (!r.started) {
    out["error"] = "cannot run: " + r.error;
    outcome = "cannot run";
  } else if (r.timed_out) {
    out["error"] = "timed out after " + format_duration(timeout);
    outcome = "timed out";
  } else if (r.signal) {
    out["error"] = "killed by signal " + std::to_string(r.signal);
    outcome = out["error"];
  } else {
    out["exit_code"] = r.exit_code;
    if (r.exit_code != 0) {
      out["error"] = "exit status " + std::to_string(r.exit_code);
      if (!r.errors.empty()) out["stderr"] = utf8::sanitized(r.errors);
    }
    outcome = r.exit_code == 0 ? "ok" : "exit status " + std::to_string(r.exit_code);
  }
  *reply = std::move(out);
  return outcome;
}

}  // namespace

Server::Server(sd_event* loop, coap::Client& client, coap::Observer& observer,
               ServerOptions options, Builtin builtin, std::function<void()> on_state)
    : loop_(loop),
      client_(client),
      options_(std::move(options)),
      builtin_(std::move(builtin)),
      on_state_(std::move(on_state)),
      subscription_(
          loop, observer, credentials::api_path(options_.token, "rpc"), "RPC",
          coap::SubscriptionOptions{options_.reregister_interval},
          [this](const coap::Notification& n) { on_notification(n); },
          [this](const std::string&) {
            if (on_state_) on_state_();
          }) {}

Server::~Server() { *alive_ = false; }

void Server::start() { subscription_.start(); }
void Server::renew() { subscription_.renew(); }

void Server::set_methods(std::map<std::string, config::RpcMethodConfig> methods) {
  options_.methods = std::move(methods);
}

void Server::on_notification(const coap::Notification& n) {
  if (n.first) return;  // §3.1: 2.03, empty: the registration is confirmed
  if (n.incomplete) {
    // Without its id there is nobody to answer; ThingsBoard marks it TIMEOUT or EXPIRED.
    spdlog::warn("RPC: request too large; nothing run");
    last_rpc_ = "refused: request too large";
    if (on_state_) on_state_();
    return;
  }
  std::string error;
  auto r = parse_request(n.payload, &error);
  if (!r) {
    // Without an id there is nobody to answer.
    spdlog::warn("RPC: request refused: {}; nothing run", error);
    last_rpc_ = "refused: " + error;
    if (on_state_) on_state_();
    return;
  }
  handle(*r);
}

void Server::handle(const Request& r) {
  const std::string key = request_key(r);
  if (auto it = entries_.find(key); it != entries_.end()) {
    Entry& e = it->second;
    if (e.running) {
      spdlog::info("RPC {} (id {}) sent again while it runs: not run again", r.method, r.id);
      return;
    }
    if (!e.confirmed) {
      spdlog::info("RPC {} (id {}) sent again: answering again without running it", r.method, r.id);
      e.attempts = 0;
      send_reply(key);
      return;
    }
    // Answered and acknowledged: ThingsBoard never sends it again, so this is a new request
    // with a recycled id (the device's actor restarted).
    entries_.erase(it);
    order_.erase(std::remove(order_.begin(), order_.end(), key), order_.end());
  }
  forget_old();
  Entry fresh;
  fresh.request = r;
  entries_[key] = std::move(fresh);
  order_.push_back(key);
  spdlog::info("RPC {} (id {}) received", r.method, r.id);

  auto alive = alive_;
  if (builtin_ && builtin_(r, [this, key, alive, method = r.method](json reply) {
        if (!*alive) return;
        finish(key, reply.is_object() ? reply.dump() : json{{"result", reply}}.dump(),
               reply.contains("error") ? "error" : "ok");
      })) {
    return;
  }
  auto m = options_.methods.find(r.method);
  if (m == options_.methods.end()) {
    spdlog::warn("RPC {} (id {}): no such method; nothing run", r.method, r.id);
    finish(key, error_reply("unknown method '" + r.method + "'"), "unknown method");
    return;
  }
  if (running_.size() >= kMaxRunning) {
    finish(key, error_reply("busy: " + std::to_string(kMaxRunning) + " commands running"), "busy");
    return;
  }
  ++commands_run_;
  const Millis timeout = m->second.timeout;
  running_[key] = std::make_unique<CommandRunner>(
      loop_, m->second.command, timeout, [this, key, timeout, alive](const CommandResult& res) {
        if (!*alive) return;
        json reply;
        const std::string outcome = command_outcome(res, timeout, &reply);
        // The runner is freed from the loop, not from inside its own callback.
        auto node = running_.extract(key);
        auto* loop = loop_;
        sd_event_source* s = nullptr;
        auto* runner = node.mapped().release();
        sd_event_add_defer(
            loop, &s,
            [](sd_event_source* src, void* u) -> int {
              delete static_cast<CommandRunner*>(u);
              sd_event_source_disable_unref(src);
              return 0;
            },
            runner);
        sd_event_source_set_floating(s, 1);
        sd_event_source_unref(s);
        finish(key, reply.dump(), outcome);
      });
}

void Server::finish(const std::string& key, const std::string& reply, const std::string& outcome) {
  auto it = entries_.find(key);
  if (it == entries_.end()) return;
  it->second.running = false;
  it->second.reply = reply;
  last_rpc_ =
      it->second.request.method + " (id " + std::to_string(it->second.request.id) + "): " + outcome;
  spdlog::info("RPC {}", last_rpc_);
  if (on_state_) on_state_();
  send_reply(key);
}

void Server::send_reply(const std::string& key) {
  auto it = entries_.find(key);
  if (it == entries_.end()) return;
  Entry& e = it->second;
  ++e.attempts;
  auto alive = alive_;
  client_.request(coap::Method::Post,
                  credentials::api_path(options_.token, "rpc", std::to_string(e.request.id)),
                  e.reply, [this, key, alive](const coap::Outcome& o) {
                    if (!*alive) return;
                    auto found = entries_.find(key);
                    if (found == entries_.end()) return;
                    Entry& entry = found->second;
                    if (o.answered() && o.response->code / 100 == 2) {
                      entry.confirmed = true;
                      return;
                    }
                    spdlog::warn("RPC {} (id {}): reply not delivered: {}", entry.request.method,
                                 entry.request.id, coap::describe(o));
                    if (entry.attempts < kMaxReplyAttempts) send_reply(key);
                  });
}

void Server::forget_old() {
  // Bounded memory: the oldest finished entries go first; running ones are kept.
  for (auto it = order_.begin(); entries_.size() >= kMaxRemembered && it != order_.end();) {
    auto e = entries_.find(*it);
    if (e != entries_.end() && e->second.running) {
      ++it;
      continue;
    }
    if (e != entries_.end()) entries_.erase(e);
    it = order_.erase(it);
  }
}

}  // namespace tb::rpc
