// The manager owns the one sd-event loop and every module on it (systemd-timesyncd's shape: a thin
// main, a manager that owns the loop). Start-up order: config → state dir and credentials → queue →
// CoAP → sources → D-Bus → READY=1 → provisioning (if needed) → delivery. Shutdown: STOPPING=1,
// stop the sources, one bounded last flush, tear down in reverse.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <systemd/sd-event.h>

#include "coap/client.hpp"
#include "config/config.hpp"
#include "credentials/credentials.hpp"
#include "daemon/downlink.hpp"
#include "daemon/notifier.hpp"
#include "daemon/uploader.hpp"
#include "dbus/status_service.hpp"
#include "provisioning/provisioner.hpp"
#include "sources/source.hpp"
#include "telemetry/queue.hpp"
#include "util/clock.hpp"
#include "util/timer.hpp"

namespace tb::daemon {

// Exit codes (docs/interface.md): 0 clean stop, 78 EX_CONFIG, 1 any other fatal error.
inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;
inline constexpr int kExitConfig = 78;

struct Overrides {
  std::optional<std::filesystem::path> state_dir;
  std::optional<std::string> log_level;
};

// Applies command-line overrides to a loaded config.
void apply_overrides(config::Config& cfg, const Overrides& overrides);

// The CoAP client's settings from the server section; every key of it, in one place (the
// Client's and the downlink Observer's transport).
coap::ClientOptions client_options(const config::ServerConfig& s);

// "" when the transport's files can be used, else why not ("server.dtls: the private key … does
// not belong to the certificate …"). Plain CoAP has none. For --check-config, start and reload.
std::string check_transport_files(const config::ServerConfig& server);

// The agent's own key and certificate in state_dir (provisioning with X509_CERTIFICATE and no
// server.dtls.cert_file; docs/security.md).
inline constexpr const char* kDeviceKeyFile = "device.key";
inline constexpr const char* kDeviceCertFile = "device.crt";

// Generates the agent's own key and certificate when the config uses them and they are missing;
// "" or what failed.
std::string prepare_device_identity(const config::Config& cfg);

class Manager {
 public:
  Manager(config::Config cfg, Overrides overrides);
  ~Manager();
  Manager(const Manager&) = delete;
  Manager& operator=(const Manager&) = delete;

  // Runs until SIGTERM/SIGINT (returns 0) or a fatal error (1, or 78 for a config problem).
  int run();

 private:
  int init();
  void start_provisioning();
  void start_delivery(const credentials::Credentials& creds);
  void start_downlink(const std::string& token);
  void on_record(telemetry::Record record);
  // The records of one loop wake-up go into the queue together (one commit): see on_record.
  void store_pending();
  static int on_store(sd_event_source* s, void* userdata);
  // Wall clock steps and a clock not set yet (docs/queue.md, "Timestamps and the clock"); returns
  // the step taken now (0: none).
  std::int64_t check_clock();
  // The state directory removed while running: made anew, the queue carried over.
  void check_state_dir();
  void on_delivery_event(const DeliveryEvent& ev);
  void begin_shutdown();
  void maybe_finish_shutdown();
  // Re-reads the config file; returns every problem, or "" when the new config is applied.
  std::string reload();
  std::string apply(const config::Config& next);
  bool build_sources(const config::Config& next, std::vector<sources::SourcePtr>* out,
                     std::string* error);
  void update_status(bool immediate = false);
  void publish_status();
  void set_error(const std::string& error);
  Millis limits_check_interval() const;
  std::string state_name() const;
  dbus::Status snapshot() const;
  std::uint64_t dropped_readings() const;

  static int on_signal(sd_event_source* s, const struct signalfd_siginfo* si, void* userdata);

  config::Config cfg_;
  Overrides overrides_;
  sd_event* loop_ = nullptr;
  std::vector<sd_event_source*> signal_sources_;
  sd_event_source* store_source_ = nullptr;         // runs store_pending() before the loop sleeps
  std::vector<telemetry::Record> pending_records_;  // collected, not yet durable
  std::uint64_t status_published_us_ = 0;           // CLOCK_BOOTTIME of the last publish_status()
  Notifier notifier_;

  std::unique_ptr<telemetry::Queue> queue_;
  std::unique_ptr<coap::Client> client_;
  std::unique_ptr<Uploader> uploader_;
  std::unique_ptr<provisioning::Provisioner> provisioner_;
  std::vector<sources::SourcePtr> sources_;
  std::unique_ptr<dbus::StatusService> bus_;
  std::unique_ptr<Downlink> downlink_;  // attributes and RPC, once there is a token
  std::unique_ptr<Timer> limits_timer_;
  std::unique_ptr<Timer> status_timer_;
  std::unique_ptr<Timer> shutdown_timer_;
  std::unique_ptr<Timer> reap_timer_;
  std::unique_ptr<Timer> release_timer_;  // start-up's memory given back (util/memory.hpp)
  std::chrono::steady_clock::time_point last_release_{};  // and housekeeping's, since

  std::optional<credentials::Credentials> creds_;
  std::string progress_;    // what provisioning is doing
  DeliveryEvent delivery_;  // the uploader's last state
  std::string last_error_;
  std::string logged_state_ = "starting";
  bool provisioning_ = false;
  // No credentials and nothing to get them with (fresh install): idle until a reload sets them.
  bool unconfigured_ = false;
  std::string status_text_;  // the last STATUS= sentence, also published as StatusText
  bool failed_ = false;
  bool stopping_ = false;
  bool push_failing_ = false;
  std::uint64_t sent_readings_ = 0;
  std::uint64_t push_dropped_readings_ = 0;
  std::uint64_t last_success_us_ = 0;
  WallClockSteps clock_steps_;
  std::int64_t restamp_after_id_ = 0;  // records after this id were collected by this run
  bool clock_set_ = true;
};

}  // namespace tb::daemon
