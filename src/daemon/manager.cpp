#include "daemon/manager.hpp"

#include <signal.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <map>

#include <nlohmann/json.hpp>

#include "daemon/status_report.hpp"
#include "sources/execd_source.hpp"
#include "sources/plugin_source.hpp"
#include "sources/source_type.hpp"
#include "util/clock.hpp"
#include "util/fs.hpp"
#include "util/log.hpp"
#include "util/memory.hpp"
#include "util/units.hpp"
#include "util/utf8.hpp"

namespace tb::daemon {

namespace {

// sd-event priorities (architecture.md, "One loop"): signals > bus > CoAP I/O > delivery >
// collection. Lower runs first.
constexpr int kPrioritySignal = -100;

// When start-up is over: the first deliveries, attribute requests and observations are done.
constexpr Millis kReleaseStartupAfter = Millis(10000);
// The once-a-minute housekeeping (queue limits, state directory and clock checks, and beside it
// the downlink's facts check and its exchange) runs code the loop does not: it is given back a
// few seconds after, at most once a minute, so that it is resident a few seconds a minute and
// not all of them. The loop's own code faults back at once (a few minor faults, no I/O).
constexpr Millis kReleaseAfterHousekeeping = Millis(3000);
constexpr Millis kReleaseAtMostEvery = Millis(30000);

// Records collected in one loop wake-up that go into the queue with one commit, at most.
constexpr std::size_t kMaxPendingRecords = 256;

std::string server_string(const config::ServerConfig& s) {
  return (s.dtls.enabled ? "coaps://" : "") + s.host + ":" + std::to_string(s.port);
}

}  // namespace

// The CoAP client's settings from the server section; every key of it, in one place.
coap::ClientOptions client_options(const config::ServerConfig& s) {
  coap::ClientOptions o;
  o.request_timeout = s.request_timeout;
  o.block_size = 1024;
  o.max_response_body = s.max_response_size;
  if (s.dtls.enabled) {
    o.dtls = coap::DtlsOptions{s.dtls.ca_file.string(), s.dtls.ca_dir.string(), s.dtls.server_name,
                               s.dtls.cert_file.string(), s.dtls.key_file.string()};
  }
  return o;
}

std::string check_transport_files(const config::ServerConfig& server) {
  if (!server.dtls.enabled) return "";
  std::string err;
  auto dtls = *client_options(server).dtls;
  // The agent's own identity is made before provisioning: until then only the CAs are checked.
  std::error_code ec;
  if (server.dtls.generated_identity &&
      (!std::filesystem::exists(dtls.cert_file, ec) || !std::filesystem::exists(dtls.key_file, ec)))
    dtls.cert_file.clear(), dtls.key_file.clear();
  if (coap::check_dtls_files(dtls, &err)) return "";
  return "server.dtls: " + err;
}

std::string prepare_device_identity(const config::Config& cfg) {
  if (!cfg.server.dtls.generated_identity) return "";
  std::string err;
  if (coap::ensure_device_identity(cfg.server.dtls.key_file.string(),
                                   cfg.server.dtls.cert_file.string(), cfg.device.name, &err))
    return "";
  return "cannot make the device's own key and certificate: " + err;
}

namespace {

std::optional<credentials::Credentials> configured_credentials(const config::Config& cfg) {
  if (cfg.credentials.type == config::CredentialsType::X509Certificate)
    return credentials::Credentials{std::string(credentials::kX509Certificate), "",
                                    cfg.device.name};
  if (!cfg.credentials.access_token.empty())
    return credentials::Credentials{std::string(credentials::kAccessToken),
                                    cfg.credentials.access_token, cfg.device.name};
  return std::nullopt;
}

// Every setting, by construction (config::same_settings), but not the position: a source that
// only moved within the file keeps running on reload.
bool same_source(const config::SourceConfig& a, const config::SourceConfig& b) {
  return config::same_settings(a, b);
}

std::string join_diagnostics(const std::vector<config::Diagnostic>& diags) {
  std::string out;
  for (const auto& d : diags) {
    if (!out.empty()) out += "\n";
    out += d.to_string();
  }
  return out;
}

}  // namespace

void apply_overrides(config::Config& cfg, const Overrides& overrides) {
  if (overrides.state_dir) cfg.state_dir = *overrides.state_dir;
  if (overrides.log_level) cfg.logging.level = *overrides.log_level;
  // Provisioning with X509_CERTIFICATE and no certificate of the operator's: the agent's own,
  // generated into state_dir (docs/security.md, "The device's own key"), presented from then on.
  config::DtlsConfig& dtls = cfg.server.dtls;
  if (cfg.provisioning.present &&
      cfg.provisioning.credentials_type == config::CredentialsType::X509Certificate &&
      dtls.enabled && dtls.cert_file.empty() && dtls.key_file.empty()) {
    dtls.cert_file = cfg.state_dir / kDeviceCertFile;
    dtls.key_file = cfg.state_dir / kDeviceKeyFile;
    dtls.generated_identity = true;
  }
}

Manager::Manager(config::Config cfg, Overrides overrides)
    : cfg_(std::move(cfg)), overrides_(std::move(overrides)) {}

Manager::~Manager() {
  // Reverse of start-up. The uploader releases its in-flight batch; the queue is durable anyway.
  if (uploader_) uploader_->pause();
  downlink_.reset();
  provisioner_.reset();
  uploader_.reset();
  sources::set_on_all_programs_stopped(nullptr);
  sources_.clear();
  bus_.reset();
  shutdown_timer_.reset();
  reap_timer_.reset();
  release_timer_.reset();
  status_timer_.reset();
  limits_timer_.reset();
  client_.reset();
  queue_.reset();
  for (auto* s : signal_sources_) sd_event_source_disable_unref(s);
  sd_event_source_disable_unref(store_source_);
  if (loop_) sd_event_unref(loop_);
}

int Manager::run() {
  int code = init();
  if (code != kExitOk) return code;
  notifier_.ready();
  spdlog::info("tb-agent running: device '{}', server {}, {} source(s)", cfg_.device.name,
               server_string(cfg_.server), sources_.size());
  if (creds_)
    start_delivery(*creds_);
  else if (!unconfigured_)
    start_provisioning();
  update_status(true);
  // Start-up's code and heap are not needed again (util/memory.hpp). Not at once: the first
  // exchanges with the server (attributes, observations, provisioning) run from the loop.
  release_timer_ = std::make_unique<Timer>(
      loop_,
      [this] {
        // Stamped first, and the release last (a tail call): code that runs after the pages
        // are dropped faults its 64 KiB window back, so only the hot functions may. This
        // lambda and steady_clock::now() are not among them; run after the release they kept
        // two windows of cold code resident (128 KiB, docs/performance.md, sixth round).
        last_release_ = std::chrono::steady_clock::now();
        release_startup_memory();
      },
      Millis(1000));
  release_timer_->arm_in(kReleaseStartupAfter);

  const int r = sd_event_loop(loop_);
  store_pending();  // the loop may have been told to exit before the store source ran
  if (r < 0) {
    spdlog::critical("event loop failed: {}", std::strerror(-r));
    return kExitFailure;
  }
  spdlog::info(
      "tb-agent stopped: {} reading(s) delivered and {} dropped since start; {} stay queued for "
      "the next start",
      sent_readings_, dropped_readings(), queue_ ? queue_->queued_readings() : 0);
  return r == 0 ? kExitOk : r;
}

int Manager::init() {
  int r = sd_event_default(&loop_);
  if (r < 0) {
    spdlog::critical("cannot create the event loop: {}", std::strerror(-r));
    return kExitFailure;
  }
  // Signals arrive through signalfd on the loop; exec sources need SIGCHLD for sd_event_add_child.
  sigset_t mask;
  sigemptyset(&mask);
  for (int sig : {SIGTERM, SIGINT, SIGHUP, SIGCHLD}) sigaddset(&mask, sig);
  sigprocmask(SIG_BLOCK, &mask, nullptr);
  for (int sig : {SIGTERM, SIGINT, SIGHUP}) {
    sd_event_source* s = nullptr;
    if (sd_event_add_signal(loop_, &s, sig, &Manager::on_signal, this) < 0) {
      spdlog::critical("cannot watch signal {}", sig);
      return kExitFailure;
    }
    sd_event_source_set_priority(s, kPrioritySignal);
    signal_sources_.push_back(s);
  }
  // WATCHDOG=1 from the loop itself, only while it turns (sd_event_set_watchdog(3)).
  sd_event_set_watchdog(loop_, true);
  // A defer source keeps the loop from sleeping while it is enabled; at a priority below
  // collection's it runs once every source that woke in this iteration has reported.
  if (sd_event_add_defer(loop_, &store_source_, &Manager::on_store, this) < 0) {
    spdlog::critical("cannot schedule storing readings on the event loop");
    return kExitFailure;
  }
  sd_event_source_set_priority(store_source_, sources::kCollectionPriority + 1);
  sd_event_source_set_enabled(store_source_, SD_EVENT_OFF);

  std::string err;
  if (!ensure_directory(cfg_.state_dir, 0700, &err)) {
    spdlog::critical("{}", err);
    return kExitFailure;
  }
  // The agent's own files are 0600 (umask 0077 at start), but a directory others may enter
  // still shows which files exist; an operator-made state_dir is not changed behind their back.
  if (struct stat st{}; ::stat(cfg_.state_dir.c_str(), &st) == 0 && (st.st_mode & 0077) != 0)
    spdlog::warn("state_dir {} is accessible to other users (mode {:04o}); chmod 700 it",
                 cfg_.state_dir.string(), st.st_mode & 07777);
  // Plugins' crash guard: a run that died inside a plugin counts a strike (docs/plugins.md).
  if (!sources::PluginSource::guard_open(cfg_.state_dir, &err)) spdlog::warn("{}", err);

  // Credentials: configured token (or certificate) first, then the stored file, else
  // provisioning.
  if (cfg_.credentials.configured()) {
    creds_ = configured_credentials(cfg_);
  } else {
    creds_ = credentials::load(cfg_.state_dir, &err);
    if (!creds_ && !err.empty()) {
      // Never provision again over an unreadable file: the device exists on the server.
      spdlog::critical("{}; fix or remove it (removing it provisions the device again)", err);
      return kExitFailure;
    }
    if (!creds_ && !cfg_.provisioning.present) {
      // A fresh install (the shipped config has provisioning commented out): start, say so on
      // D-Bus and in STATUS=, and idle — no sources, no delivery, no timers — until a reload
      // brings provisioning or a token. Exiting would leave a failed unit (docs/service.md).
      spdlog::warn(
          "{}: no credentials stored in {} and neither `provisioning` nor "
          "`credentials.access_token` is configured: idling until reloaded",
          cfg_.file.string(), cfg_.state_dir.string());
      unconfigured_ = true;
    }
  }
  if (creds_ && !creds_->device_name.empty() && creds_->device_name != cfg_.device.name)
    spdlog::info("using stored credentials of device '{}'", creds_->device_name);

  std::string warning;
  queue_ = telemetry::Queue::open(cfg_.state_dir, cfg_.queue, &warning, &err);
  if (!warning.empty()) spdlog::warn("{}", warning);
  if (!queue_) {
    spdlog::critical("cannot open the telemetry queue: {}", err);
    return kExitFailure;
  }
  // SQLite creates a database 0644 whatever the umask (it fchmods a new file to its default
  // mode) and gives -wal/-shm the database's mode: make them the agent's alone, also when an
  // older version left them readable. Telemetry is the operator's business, not every user's.
  for (const char* name : {"queue.db", "queue.db-wal", "queue.db-shm"}) {
    const auto file = cfg_.state_dir / name;
    if (::chmod(file.c_str(), 0600) != 0 && errno != ENOENT)
      spdlog::warn("cannot make {} private: {}", file.string(), std::strerror(errno));
  }
  if (queue_->queued_readings() > 0)
    spdlog::info("{} reading(s) queued from before", queue_->queued_readings());
  restamp_after_id_ = queue_->last_id();
  check_clock();

  if (const auto problem = prepare_device_identity(cfg_); !problem.empty()) {
    spdlog::critical("{}", problem);
    return kExitFailure;
  }
  if (const auto problem = check_transport_files(cfg_.server); !problem.empty()) {
    spdlog::critical("{}", problem);
    return kExitConfig;
  }
  client_ = coap::Client::create(loop_, {cfg_.server.host, cfg_.server.port},
                                 client_options(cfg_.server), &err);
  if (!client_) {
    spdlog::critical("cannot set up CoAP to {}: {}", server_string(cfg_.server), err);
    return kExitFailure;
  }

  Uploader::Callbacks cb;
  cb.state_changed = [this](const DeliveryEvent& ev) { on_delivery_event(ev); };
  cb.delivered = [this](std::uint64_t n) {
    sent_readings_ += n;
    last_success_us_ = wall_us();
    if (!failed_) last_error_.clear();
    update_status();
    maybe_finish_shutdown();
  };
  cb.dropped = [this](std::uint64_t) { update_status(); };
  uploader_ = std::make_unique<Uploader>(loop_, *queue_, cfg_.delivery, cfg_.queue.drain_rate,
                                         std::move(cb));

  // Shutdown waits (within shutdown_timeout) for stopped execd programs to exit.
  sources::set_on_all_programs_stopped([this] { maybe_finish_shutdown(); });
  if (!build_sources(cfg_, &sources_, &err)) {
    spdlog::critical("{}", err);
    return kExitConfig;
  }
  for (auto& s : sources_) {
    if (unconfigured_) break;  // built (so a reload knows them), started once configured
    if (!s->start([this](telemetry::Record rec) { on_record(std::move(rec)); }, &err)) {
      spdlog::critical("cannot start source '{}': {}", s->config().name, err);
      return kExitFailure;
    }
  }

  limits_timer_ = std::make_unique<Timer>(
      loop_,
      [this] {
        check_clock();
        check_state_dir();
        // max_age means nothing while the clock is not set: only the size limit applies.
        const std::int64_t now = clock_set_ ? wall_ms() : std::numeric_limits<std::int64_t>::min();
        if (const auto n = queue_->enforce_limits(now)) {
          spdlog::warn("queue limits reached: dropped the {} oldest reading(s)", n);
          update_status();
        }
        limits_timer_->arm_in(limits_check_interval());
        if (release_timer_ && !release_timer_->armed() &&
            std::chrono::steady_clock::now() - last_release_ >= kReleaseAtMostEvery)
          release_timer_->arm_in(kReleaseAfterHousekeeping);
      },
      Millis(100));
  if (!unconfigured_) limits_timer_->arm_in(limits_check_interval());
  status_timer_ = std::make_unique<Timer>(
      loop_, [this] { publish_status(); }, Millis(100));
  reap_timer_ = std::make_unique<Timer>(
      loop_, [this] { provisioner_.reset(); }, Millis(1));
  shutdown_timer_ = std::make_unique<Timer>(
      loop_,
      [this] {
        spdlog::warn("shutdown: last flush did not finish within {}; {} reading(s) stay queued",
                     format_duration(cfg_.delivery.shutdown_timeout), queue_->queued_readings());
        sd_event_exit(loop_, 0);
      },
      Millis(10), CLOCK_MONOTONIC);

  if (cfg_.dbus.bus != config::BusKind::None) {
    dbus::Handlers h;
    h.flush = [this] {
      spdlog::info("flush requested over D-Bus");
      if (provisioner_) provisioner_->retry_now();
      if (uploader_) uploader_->flush_now();
    };
    h.reload = [this] { return reload(); };
    bus_ = dbus::StatusService::create(
        loop_, cfg_.dbus.bus, [this] { return snapshot(); }, std::move(h), &err);
    // Only a setup failure lands here; a bus that is not (yet) reachable is retried by the service.
    if (!bus_) spdlog::warn("D-Bus status is unavailable ({}); running without it", err);
  }
  return kExitOk;
}

bool Manager::build_sources(const config::Config& next, std::vector<sources::SourcePtr>* out,
                            std::string* error) {
  for (const auto& sc : next.sources) {
    std::string err;
    auto s = sources::make_source(loop_, sc, &err);
    if (!s) {
      *error = next.file.string() + ":" + std::to_string(sc.position.line) + ":" +
               std::to_string(sc.position.column) + ": source '" + sc.name + "': " + err;
      return false;
    }
    out->push_back(std::move(s));
  }
  return true;
}

void Manager::start_provisioning() {
  reap_timer_->disarm();  // a finished provisioner awaiting reaping is replaced right here
  provisioning_ = true;
  provisioning::Options opt;
  opt.key = cfg_.provisioning.key;
  opt.secret = cfg_.provisioning.secret;
  opt.device_name = cfg_.device.name;
  opt.state_dir = cfg_.state_dir;
  if (cfg_.provisioning.credentials_type == config::CredentialsType::X509Certificate)
    opt.certificate_file = cfg_.server.dtls.cert_file;
  opt.backoff_initial = cfg_.delivery.backoff_initial;
  opt.backoff_max = cfg_.delivery.backoff_max;
  provisioner_ = std::make_unique<provisioning::Provisioner>(
      loop_, *client_, opt,
      [this](const provisioning::Result& r) {
        provisioning_ = false;
        if (r.ok) {
          creds_ = r.credentials;
          failed_ = false;
          last_error_.clear();
          start_delivery(*creds_);
        } else {
          failed_ = true;
          set_error(r.error);
        }
        update_status(true);
        // The provisioner may not be destroyed from inside its own callback: do it next turn.
        reap_timer_->arm_in(Millis(0));
      },
      [this](const std::string& msg) {
        progress_ = msg;
        // A retry says why (a timeout, 5.00, a name that does not resolve): that is LastError too.
        if (msg.rfind("provisioning: retrying", 0) == 0) set_error(msg);
        update_status(true);
      });
  update_status(true);
  provisioner_->start();
}

void Manager::start_delivery(const credentials::Credentials& creds) {
  if (stopping_) return;
  uploader_->start(client_.get(), creds.path_token());
  start_downlink(creds.path_token());
}

// Attributes and server-side RPC (docs/attributes.md): remote settings are applied
// as a reload applies a config, and getStatus answers what `tb-agent status --json` prints.
void Manager::start_downlink(const std::string& token) {
  // Never called from inside the Downlink: its RPC reload runs from a loop source of its own.
  downlink_.reset();
  DownlinkHooks hooks;
  hooks.apply = [this](const config::Config& next) {
    std::string problems = apply(next);
    if (problems.empty()) update_status(true);
    return problems;
  };
  hooks.reload = [this] { return reload(); };
  hooks.flush = [this] {
    if (uploader_) uploader_->flush_now();
  };
  hooks.status = [this] {
    return nlohmann::json::parse(format_status_json(snapshot(), wall_us()), nullptr, false);
  };
  hooks.changed = [this] { update_status(true); };
  std::string err;
  downlink_ = Downlink::create(loop_, *client_, cfg_, token, std::move(hooks), &err);
  if (!downlink_) {
    spdlog::error("attributes and RPC are unavailable: {}", err);
    return;
  }
  downlink_->start();
}

void Manager::check_state_dir() {
  if (::access(queue_->path().c_str(), F_OK) == 0 || errno != ENOENT) return;
  // Someone removed the state directory (or the queue file) while we run. The open queue still
  // holds every record: write it, and the credentials we hold, to a new directory.
  spdlog::error(
      "the queue file {} vanished (state directory removed?): making the state "
      "directory anew and carrying the queued readings over",
      queue_->path().string());
  std::string err;
  if (!ensure_directory(cfg_.state_dir, 0700, &err) || !queue_->recreate_file(&err)) {
    spdlog::error("cannot make the state directory anew: {}", err);
    set_error("state directory vanished: " + err);
    return;
  }
  if (creds_ && !cfg_.credentials.configured() && !credentials::save(cfg_.state_dir, *creds_, &err))
    spdlog::error("cannot store the credentials again: {}", err);
}

std::int64_t Manager::check_clock() {
  const std::int64_t step = clock_steps_.take_step();
  std::string err;
  std::uint64_t moved = 0;
  if (step != 0) {
    // The clock was wrong by `step` until now: what this run collected before carries the old
    // clock's time, so it moves with it. Records of earlier runs keep their timestamps.
    if (!queue_->shift_ts(restamp_after_id_, step, &moved, &err))
      spdlog::error("the system clock was stepped, but cannot re-stamp queued readings: {}", err);
    // Said to the second: the step is measured from two clock reads, and a preemption between
    // them adds milliseconds that are not the step's (a step of 3h read as "3h4ms").
    const std::int64_t whole_s = (std::llabs(step) + 500) / 1000;
    spdlog::warn("the system clock was stepped by {}{}; re-stamped {} queued record(s) of this run",
                 step < 0 ? "-" : "+", format_duration(Millis(whole_s * 1000)), moved);
  }
  const bool set = wall_clock_set(wall_ms());
  if (set != clock_set_) {
    clock_set_ = set;
    queue_->hold_before(set ? 0 : clock_floor_ms());
    if (set) {
      spdlog::info("the system clock is set: delivering the readings held until now");
      if (uploader_) uploader_->kick();
    } else {
      spdlog::warn(
          "the system clock is not set (it is before this build): readings are queued but held "
          "until it is, then re-stamped (docs/queue.md, \"Timestamps and the clock\")");
    }
  }
  return step;
}

void Manager::on_record(telemetry::Record record) {
  // Taken before the step was seen, the record carries the old clock's time (a record taken
  // after it is within moments of now).
  if (const std::int64_t step = check_clock();
      step != 0 && std::llabs(record.ts_ms - wall_ms()) > std::llabs(step) / 2)
    record.ts_ms += step;
  // Not pushed here: sources that woke together (their timers coalesce, architecture.md "One
  // loop") report one after the other in this loop iteration, and one commit for all of them is
  // one fsync instead of one each. The store source runs before the loop sleeps again, and
  // nothing (log, counters, delivery) treats a record as queued before then (docs/queue.md).
  pending_records_.push_back(std::move(record));
  // Bounded: a source whose input is always ready (an execd program writing flat out) could keep
  // the lower-priority store source from running.
  if (store_source_ && pending_records_.size() < kMaxPendingRecords)
    sd_event_source_set_enabled(store_source_, SD_EVENT_ONESHOT);
  else
    store_pending();
}

int Manager::on_store(sd_event_source*, void* userdata) {
  auto* self = static_cast<Manager*>(userdata);
  try {
    self->store_pending();
  } catch (const std::exception& e) {
    spdlog::error("internal error storing readings: {}", e.what());
  } catch (...) {
    spdlog::error("internal error storing readings");
  }
  return 0;
}

void Manager::store_pending() {
  if (pending_records_.empty() || !queue_) return;
  const auto records = std::move(pending_records_);
  pending_records_.clear();
  check_state_dir();
  std::string err;
  if (!queue_->push_all(records, &err)) {
    for (const auto& r : records) push_dropped_readings_ += r.readings.size();
    if (!push_failing_) {
      // Every source whose readings this commit held, each named once.
      std::string sources;
      for (const auto& r : records)
        if (sources.find("'" + r.source + "'") == std::string::npos)
          sources += (sources.empty() ? "'" : ", '") + r.source + "'";
      spdlog::error("cannot queue readings of {}: {}", sources, err);
    }
    push_failing_ = true;
    set_error("cannot queue readings: " + err);
    update_status();
    return;
  }
  // One line per durable record: what the kill -9 tests hold the agent to.
  for (const auto& r : records)
    spdlog::debug("queued {} reading(s) from '{}' ts={}", r.readings.size(), r.source, r.ts_ms);
  if (push_failing_) {
    spdlog::info("queueing readings works again");
    push_failing_ = false;
  }
  if (uploader_) uploader_->kick();
  update_status();
}

void Manager::on_delivery_event(const DeliveryEvent& ev) {
  // The server answers again after failed deliveries (an outage, a network change): the
  // observations may be gone with it, so they are registered again now, not at the interval.
  if (downlink_ && delivery_.state == DeliveryState::Retrying && ev.state == DeliveryState::Idle)
    downlink_->renew();
  delivery_ = ev;
  if (!ev.error.empty()) set_error(ev.error);
  update_status(true);
  maybe_finish_shutdown();
}

int Manager::on_signal(sd_event_source*, const struct signalfd_siginfo* si, void* userdata) {
  auto* self = static_cast<Manager*>(userdata);
  try {
    if (si->ssi_signo == SIGHUP) {
      spdlog::info("SIGHUP: reloading {}", self->cfg_.file.string());
      self->reload();
    } else if (self->stopping_) {
      spdlog::warn("second stop signal: exiting without waiting for the last flush");
      sd_event_exit(self->loop_, 0);
    } else {
      spdlog::info("{}: stopping", si->ssi_signo == SIGTERM ? "SIGTERM" : "SIGINT");
      self->begin_shutdown();
    }
  } catch (const std::exception& e) {
    spdlog::error("internal error handling a signal: {}", e.what());
  } catch (...) {
    spdlog::error("internal error handling a signal");
  }
  return 0;
}

void Manager::begin_shutdown() {
  store_pending();  // before counting what the last flush must deliver
  stopping_ = true;
  notifier_.stopping();
  for (auto& s : sources_) s->stop();
  provisioner_.reset();
  provisioning_ = false;
  update_status(true);
  shutdown_timer_->arm_in(cfg_.delivery.shutdown_timeout);
  // One last attempt even while backing off: the server may be back and the wait is bounded by
  // shutdown_timeout. Not while unauthorized — the server has said no to this token.
  if (uploader_->started() && queue_->queued_readings() > 0 &&
      uploader_->state() != DeliveryState::Unauthorized) {
    spdlog::info("shutdown: last flush of {} reading(s) (at most {})", queue_->queued_readings(),
                 format_duration(cfg_.delivery.shutdown_timeout));
    uploader_->flush_now();
  }
  maybe_finish_shutdown();
}

void Manager::maybe_finish_shutdown() {
  if (!stopping_) return;
  const bool drained = queue_->queued_readings() == 0;
  const bool cannot_send = !uploader_->started() || uploader_->state() != DeliveryState::Idle;
  if ((drained || cannot_send) && !uploader_->busy() && sources::stopping_programs() == 0)
    sd_event_exit(loop_, 0);
}

std::string Manager::reload() {
  notifier_.reloading();
  sources::PluginSource::guard_forgive();  // an operator's reload tries disabled plugins again
  auto result = config::load_file(cfg_.file, sources::source_types());
  std::string problems;
  if (!result.ok()) {
    problems = join_diagnostics(result.diagnostics);
  } else {
    apply_overrides(*result.config, overrides_);
    if (downlink_) downlink_->file_config_changed(*result.config);
    problems = apply(downlink_ ? downlink_->with_remote_settings(*result.config) : *result.config);
  }
  if (!problems.empty()) {
    spdlog::error("reload refused, still running on the previous configuration:\n{}", problems);
    // LastError is a D-Bus string: bounded, cut on a character boundary, valid UTF-8.
    constexpr std::size_t kMaxErrorBytes = 4096;
    std::string error = "reload refused, still running on the previous configuration: " + problems;
    if (error.size() > kMaxErrorBytes)
      error = std::string(utf8::prefix(error, kMaxErrorBytes)) + "...";
    set_error(utf8::sanitized(error));
  } else {
    spdlog::info("configuration reloaded");
    if (downlink_) downlink_->applied(cfg_);
  }
  update_status(true);
  notifier_.ready();
  // The reload ran the configuration parser and built what changed: give that code back too.
  if (release_timer_) release_timer_->arm_in(kReleaseStartupAfter);
  return problems;
}

std::string Manager::apply(const config::Config& next) {
  if (next.state_dir != cfg_.state_dir)
    return next.file.string() + ": state_dir cannot change while running; restart the service";

  // Stage everything that can fail before changing anything (Kea's staged apply with rollback).
  std::map<std::string, const config::SourceConfig*> old_by_name;
  for (const auto& s : cfg_.sources) old_by_name[s.name] = &s;
  std::vector<sources::SourcePtr> fresh;
  config::Config changed_only = next;
  changed_only.sources.clear();
  for (const auto& sc : next.sources) {
    auto it = old_by_name.find(sc.name);
    if (it == old_by_name.end() || !same_source(*it->second, sc))
      changed_only.sources.push_back(sc);
  }
  std::string err;
  if (!build_sources(changed_only, &fresh, &err)) return err;

  std::unique_ptr<coap::Client> new_client;
  const bool server_changed = next.server != cfg_.server;
  // With DTLS a reload also re-reads the CA, certificate and key files (renewed in place, same
  // paths): a new client, a new handshake.
  const bool new_transport = server_changed || next.server.dtls.enabled;
  if (new_transport) {
    if (const auto problem = prepare_device_identity(next); !problem.empty()) return problem;
    if (const auto problem = check_transport_files(next.server); !problem.empty()) return problem;
    new_client = coap::Client::create(loop_, {next.server.host, next.server.port},
                                      client_options(next.server), &err);
    if (!new_client) return "cannot set up CoAP to " + server_string(next.server) + ": " + err;
  }

  // Commit.
  log::set_level(next.logging.level);
  queue_->set_limits(next.queue);
  uploader_->reconfigure(next.delivery, next.queue.drain_rate);
  if (next.dbus.bus != cfg_.dbus.bus)
    spdlog::warn("dbus.bus changed: takes effect when the service restarts");

  // Still nothing to get credentials with: sources stay built but idle (see init()).
  const bool stays_unconfigured =
      unconfigured_ && !creds_ && !next.credentials.configured() && !next.provisioning.present;
  // Sources: keep the unchanged ones running, replace the changed, drop the removed.
  std::map<std::string, sources::SourcePtr> running;
  for (auto& s : sources_) running[s->config().name] = std::move(s);
  sources_.clear();
  auto fresh_it = fresh.begin();
  for (const auto& sc : next.sources) {
    auto it = running.find(sc.name);
    if (it != running.end() && same_source(it->second->config(), sc)) {
      sources_.push_back(std::move(it->second));
      running.erase(it);
    } else {
      // A changed source: the old one stops before its replacement starts, and is not reported
      // as removed below — one log line per event.
      const bool replaced = it != running.end();
      if (replaced) running.erase(it);
      sources_.push_back(std::move(*fresh_it++));
      if (stays_unconfigured) continue;
      if (!sources_.back()->start([this](telemetry::Record rec) { on_record(std::move(rec)); },
                                  &err))
        spdlog::error("cannot start source '{}': {}", sc.name, err);
      else if (replaced)
        spdlog::info("source '{}' changed: restarted with its new settings", sc.name);
      else
        spdlog::info("source '{}' added", sc.name);
    }
  }
  for (auto& [name, s] : running) {
    s->stop();
    spdlog::info("source '{}' removed", name);
  }
  running.clear();

  if (new_transport) {
    if (server_changed)
      spdlog::info("server changed to {}", server_string(next.server));
    else
      spdlog::info("DTLS: the CA, certificate and key files are read again");
    uploader_->pause();
    const bool was_provisioning = provisioner_ != nullptr;
    provisioner_.reset();
    downlink_.reset();  // it uses the old client; started again below for the new server
    client_ = std::move(new_client);
    if (creds_) uploader_->set_client(client_.get());
    cfg_.server = next.server;
    if (creds_) start_downlink(creds_->path_token());
    if (was_provisioning) {
      cfg_ = next;
      start_provisioning();
    }
  } else if (client_) {
    // Same name, but its DNS answer may have changed: the next request asks again.
    client_->refresh_address();
  }

  const bool token_changed = next.credentials.configured() &&
                             (next.credentials.access_token != cfg_.credentials.access_token ||
                              next.credentials.type != cfg_.credentials.type);
  const bool retry_provisioning =
      (failed_ || unconfigured_) && !creds_ && next.provisioning.present;
  if (unconfigured_ && !stays_unconfigured) {
    // Configured at last: what init() left idle starts now (the changed sources already did).
    unconfigured_ = false;
    spdlog::info(
        "configured: starting sources and {}",
        next.provisioning.present && !next.credentials.configured() ? "provisioning" : "delivery");
    for (auto& s : sources_) {
      if (s->started()) continue;
      if (!s->start([this](telemetry::Record rec) { on_record(std::move(rec)); }, &err))
        spdlog::error("cannot start source '{}': {}", s->config().name, err);
    }
    limits_timer_->arm_in(limits_check_interval());
  }
  cfg_ = next;
  if (token_changed) {
    creds_ = configured_credentials(next);
    provisioner_.reset();
    provisioning_ = false;
    failed_ = false;
    uploader_->start(client_.get(), creds_->path_token());
    start_downlink(creds_->path_token());
  } else if (retry_provisioning) {
    failed_ = false;
    last_error_.clear();
    start_provisioning();
  } else if (creds_ && uploader_->state() != DeliveryState::Idle) {
    // A reload is an operator's nudge: try the server again now.
    uploader_->flush_now();
  }
  return "";
}

void Manager::set_error(const std::string& error) { last_error_ = error; }

Millis Manager::limits_check_interval() const {
  // Often enough that a reading outlives queue.max_age by at most a tenth of it, at most once a
  // minute and at least once a second.
  return std::clamp(Millis(cfg_.queue.max_age.count() / 10), Millis(1000), Millis(60000));
}

std::uint64_t Manager::dropped_readings() const {
  return (queue_ ? queue_->dropped_readings() : 0) + push_dropped_readings_;
}

std::string Manager::state_name() const {
  if (stopping_) return "stopping";
  if (unconfigured_) return "unconfigured";
  if (failed_) return "failed";
  if (provisioning_) return "provisioning";
  if (!creds_) return "starting";
  switch (delivery_.state) {
    case DeliveryState::Unauthorized:
      return "unauthorized";
    case DeliveryState::Retrying:
      return "retrying";
    case DeliveryState::Idle:
      break;
  }
  return "running";
}

dbus::Status Manager::snapshot() const {
  dbus::Status s;
  s.state = state_name();
  s.device_name = creds_ && !creds_->device_name.empty() ? creds_->device_name : cfg_.device.name;
  s.provisioned = creds_.has_value();
  s.server = server_string(cfg_.server);
  s.queued_readings = queue_ ? queue_->queued_readings() : 0;
  s.sent_readings = sent_readings_;
  s.dropped_readings = dropped_readings();
  s.last_success_time = last_success_us_;
  s.last_error = last_error_;
  for (const auto& src : sources_) {
    const auto& st = src->status();
    s.sources.push_back(
        {st.name, st.type, static_cast<std::uint64_t>(st.interval.count()) * 1000, st.readings,
         st.errors, static_cast<std::uint64_t>(std::max<std::int64_t>(st.last_ts_ms, 0)) * 1000,
         st.last_error});
  }
  s.status_text = status_text_;
  if (downlink_) {
    s.attributes_observation = downlink_->attributes_observation();
    s.rpc_observation = downlink_->rpc_observation();
    s.last_rpc = downlink_->last_rpc();
    s.last_remote_change = downlink_->last_remote_change();
  }
  return s;
}

void Manager::update_status(bool immediate) {
  if (immediate) {
    status_timer_->disarm();
    publish_status();
  } else if (!status_timer_->armed()) {
    // Counters change with every reading; the service manager and the bus hear at most once
    // a second (docs/interface.md allows counters to be rate-limited). The first change after a
    // quiet second goes out at once: a timer for it would be one more wake-up per reading.
    constexpr std::uint64_t kStatusIntervalUs = 1000000;
    std::uint64_t now = 0;
    sd_event_now(loop_, CLOCK_BOOTTIME, &now);
    if (now - status_published_us_ >= kStatusIntervalUs)
      publish_status();
    else
      status_timer_->arm_in(Millis((status_published_us_ + kStatusIntervalUs - now + 999) / 1000));
  }
}

void Manager::publish_status() {
  sd_event_now(loop_, CLOCK_BOOTTIME, &status_published_us_);
  const std::string state = state_name();
  const std::uint64_t queued = queue_ ? queue_->queued_readings() : 0;
  std::string text;
  if (state == "stopping") {
    text = "stopping: last flush of " + std::to_string(queued) + " queued reading(s)";
  } else if (state == "unconfigured") {
    text = "not configured: set provisioning (or credentials.access_token) in " +
           cfg_.file.string() + ", then systemctl reload tb-agent";
  } else if (state == "failed") {
    text = "failed: " + last_error_;
  } else if (state == "provisioning") {
    text = progress_.empty() ? "provisioning" : progress_;
  } else if (state == "unauthorized") {
    text = std::string("unauthorized: the server rejects the ") +
           (creds_ && creds_->x509() ? "device's certificate; " : "access token; ") +
           std::to_string(queued) + " reading(s) kept";
  } else if (state == "retrying") {
    text = "retrying in " + format_duration(delivery_.retry_in) + ": " + delivery_.error + "; " +
           std::to_string(queued) + " reading(s) queued";
  } else if (queued > 0) {
    text = "delivering " + std::to_string(queued) + " queued reading(s)";
  } else {
    text = "running: " + std::to_string(sent_readings_) + " reading(s) delivered";
  }
  notifier_.status(text);
  status_text_ = text;
  if (state != logged_state_) {
    // One journal entry per transition, with TB_STATE= so `journalctl TB_STATE=unauthorized`
    // finds them; louder for the states an operator must look at.
    log::FieldGuard field("TB_STATE", state);
    const auto level = state == "failed"                                  ? spdlog::level::err
                       : (state == "retrying" || state == "unauthorized") ? spdlog::level::warn
                                                                          : spdlog::level::info;
    spdlog::log(level, "state {} -> {}: {}", logged_state_, state, text);
    logged_state_ = state;
  }
  if (bus_) bus_->changed();
}

}  // namespace tb::daemon
