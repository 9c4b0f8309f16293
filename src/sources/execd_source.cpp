#include "sources/execd_source.hpp"

#include <signal.h>
#include <sys/epoll.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <exception>
#include <tuple>

#include <spdlog/spdlog.h>

#include "sources/exec_source.hpp"
#include "sources/source_type.hpp"
#include "sources/text.hpp"
#include "util/clock.hpp"
#include "util/log.hpp"
#include "util/units.hpp"

namespace tb::sources {

namespace {

constexpr std::uint64_t kSecond = 1000000;
constexpr Millis kRejectLogInterval{60000};
// Milliseconds since 1970 below this are 1973: a program printing seconds by mistake.
constexpr std::int64_t kMinTsMs = 100000000000;

std::size_t g_stopping = 0;
std::function<void()> g_on_all_stopped;

std::uint64_t usec(Millis d) { return static_cast<std::uint64_t>(d.count()) * 1000; }

std::string exit_text(const siginfo_t& si) {
  if (si.si_code == CLD_EXITED) return "exited with status " + std::to_string(si.si_status);
  const char* abbrev = sigabbrev_np(si.si_status);
  return "was killed by " +
         (abbrev ? std::string("SIG") + abbrev : "signal " + std::to_string(si.si_status));
}

template <typename F>
int guarded(const char* what, F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    spdlog::error("internal error in an execd source {} callback: {}", what, e.what());
  } catch (...) {
    spdlog::error("internal error in an execd source {} callback", what);
  }
  return 0;
}

}  // namespace

std::size_t stopping_programs() { return g_stopping; }
void set_on_all_programs_stopped(std::function<void()> on_all_stopped) {
  g_on_all_stopped = std::move(on_all_stopped);
}

// One program's child source, and after stop() its SIGKILL timer. Both sources are floating
// (the loop owns them), so a stopped program is still reaped after its ExecdSource is gone, and
// freeing the loop kills and reaps it (child_process_own). Deleted when both sources are.
struct ExecdSource::Watch {
  ExecdSource* owner = nullptr;  // nullptr once stopped
  pid_t pid = 0;
  std::string name;  // the source's, for logs after the source is gone
  sd_event_source* child = nullptr;
  sd_event_source* kill_timer = nullptr;
  int refs = 0;
  bool counted = false;  // counted in g_stopping

  static void child_destroyed(void* userdata) {
    auto* w = static_cast<Watch*>(userdata);
    w->child = nullptr;
    if (w->counted) {
      w->counted = false;
      --g_stopping;
    }
    if (--w->refs == 0) delete w;
  }
  static void timer_destroyed(void* userdata) {
    auto* w = static_cast<Watch*>(userdata);
    w->kill_timer = nullptr;
    if (--w->refs == 0) delete w;
  }
  static int on_kill_timer(sd_event_source* s, std::uint64_t, void* userdata) {
    auto* w = static_cast<Watch*>(userdata);
    return guarded("kill timer", [&] {
      log::FieldGuard field("TB_SOURCE", w->name);
      spdlog::warn("source '{}': pid {} did not exit after SIGTERM; sending SIGKILL", w->name,
                   w->pid);
      ::kill(-w->pid, SIGKILL);
      if (w->child) sd_event_source_send_child_signal(w->child, SIGKILL, nullptr, 0);
      sd_event_source_unref(s);  // w may be gone from here on
    });
  }
};

const SourceType& ExecdSource::declaration() {
  static const SourceType type =
      declare("execd", Collection::Push, kProgramKeys, &ExecdSource::create);
  return type;
}

SourcePtr ExecdSource::create(sd_event* loop, const config::SourceConfig& config,
                              std::string* error) {
  if (std::string e = check_program(*config::settings_of<ProgramSettings>(config)); !e.empty()) {
    *error = std::move(e);
    return nullptr;
  }
  return SourcePtr(new ExecdSource(loop, config));
}

ExecdSource::ExecdSource(sd_event* loop, config::SourceConfig config)
    : Source(loop, std::move(config), "execd"),
      settings_(static_cast<const ProgramSettings&>(*config_.settings)),
      env_(program_environment(config_.name, settings_)) {
  status_.interval = Millis(0);  // no interval: the program reports when it has readings
}

ExecdSource::~ExecdSource() {
  started_ = false;
  emit_ = nullptr;
  terminate();
  close_pipes();
  for (auto* t : {&restart_timer_, &throttle_timer_, &wait_timer_})
    *t = sd_event_source_disable_unref(*t);
}

std::uint64_t ExecdSource::now_usec() const {
  std::uint64_t now = 0;
  sd_event_now(loop_, CLOCK_BOOTTIME, &now);
  return now;
}

bool ExecdSource::start(std::function<void(telemetry::Record)> emit, std::string* error) {
  if (started_) {
    if (error) *error = "already started";
    return false;
  }
  started_ = true;
  emit_ = std::move(emit);
  const bool restart_pending =
      restart_timer_ && sd_event_source_get_enabled(restart_timer_, nullptr) > 0;
  if (!child_ && !restart_pending && !spawn()) schedule_restart();
  return true;
}

void ExecdSource::stop() {
  started_ = false;
  emit_ = nullptr;
  if (restart_timer_) sd_event_source_set_enabled(restart_timer_, SD_EVENT_OFF);
  if (throttle_timer_) sd_event_source_set_enabled(throttle_timer_, SD_EVENT_OFF);
  abort();
  terminate();
}

bool ExecdSource::spawn() {
  log::FieldGuard field("TB_SOURCE", config_.name);
  SpawnedProgram p;
  if (std::string e = spawn_program(settings_.command, env_, settings_.working_directory, &p);
      !e.empty()) {
    ++status_.errors;
    status_.last_error = e;
    spdlog::error("source '{}': {}", config_.name, e);
    return false;
  }
  auto* w = new Watch;
  w->owner = this;
  w->pid = p.pid;
  w->name = config_.name;
  int r = sd_event_add_child(loop_, &w->child, p.pid, WEXITED, &ExecdSource::on_child, w);
  if (r < 0) {
    // Just spawned, so it cannot be stuck anywhere yet: kill and reap it right here.
    ::kill(p.pid, SIGKILL);
    while (waitpid(p.pid, nullptr, 0) < 0 && errno == EINTR) {
    }
    ::close(p.stdout_fd);
    ::close(p.stderr_fd);
    delete w;
    ++status_.errors;
    status_.last_error = std::string("cannot watch the program: ") + std::strerror(-r);
    spdlog::error("source '{}': {}", config_.name, status_.last_error);
    return false;
  }
  w->refs = 1;
  sd_event_source_set_destroy_callback(w->child, &Watch::child_destroyed);
  sd_event_source_set_child_process_own(w->child, 1);
  sd_event_source_set_priority(w->child, kCollectionPriority);
  sd_event_source_set_floating(w->child, 1);
  sd_event_source_unref(w->child);  // the loop holds it now; w->child stays valid until destroyed
  child_ = w;
  pid_ = p.pid;
  spawned_at_ = now_usec();
  ++spawns_;
  out_buf_.clear();
  err_buf_.clear();
  discarding_ = err_discarding_ = false;

  for (auto [src, fd, cb] : {std::tuple{&out_, p.stdout_fd, &ExecdSource::on_stdout},
                             std::tuple{&err_, p.stderr_fd, &ExecdSource::on_stderr}}) {
    r = sd_event_add_io(loop_, src, fd, EPOLLIN, cb, this);
    if (r < 0) {
      *src = nullptr;
      ::close(fd);
      spdlog::error("source '{}': cannot watch the program's output: {}", config_.name,
                    std::strerror(-r));
      continue;  // the program dies of SIGPIPE or is stopped; either way it is restarted
    }
    sd_event_source_set_io_fd_own(*src, 1);
    sd_event_source_set_priority(*src, kCollectionPriority);
  }
  spdlog::info("source '{}': started {} (pid {})", config_.name, settings_.command.front(), p.pid);
  return true;
}

void ExecdSource::schedule_restart() {
  const Millis delay = backoff_.next();
  const std::uint64_t at = now_usec() + usec(delay);
  if (!restart_timer_) {
    if (sd_event_add_time(loop_, &restart_timer_, CLOCK_BOOTTIME, at, 1000, &ExecdSource::on_timer,
                          this) < 0) {
      restart_timer_ = nullptr;
      spdlog::critical("source '{}': cannot create a timer; the program is not restarted",
                       config_.name);
      return;
    }
    sd_event_source_set_priority(restart_timer_, kCollectionPriority);
  } else {
    sd_event_source_set_time(restart_timer_, at);
  }
  sd_event_source_set_enabled(restart_timer_, SD_EVENT_ONESHOT);
  log::FieldGuard field("TB_SOURCE", config_.name);
  spdlog::info("source '{}': restarting {} in {}", config_.name, settings_.command.front(),
               format_duration(delay));
}

void ExecdSource::terminate() {
  if (!child_) return;
  Watch* w = child_;
  child_ = nullptr;
  close_pipes();  // nobody reads them any more; a write gets EPIPE
  w->owner = nullptr;
  w->counted = true;
  ++g_stopping;
  // The group first (helpers it started), then the program itself through its pidfd in case it
  // left the group.
  ::kill(-w->pid, SIGTERM);
  if (w->child) sd_event_source_send_child_signal(w->child, SIGTERM, nullptr, 0);
  if (sd_event_add_time_relative(loop_, &w->kill_timer, CLOCK_BOOTTIME, usec(stop_grace_), 10000,
                                 &Watch::on_kill_timer, w) < 0) {
    w->kill_timer = nullptr;
    ::kill(-w->pid, SIGKILL);  // no grace without a timer
    if (w->child) sd_event_source_send_child_signal(w->child, SIGKILL, nullptr, 0);
    return;
  }
  ++w->refs;
  sd_event_source_set_destroy_callback(w->kill_timer, &Watch::timer_destroyed);
  sd_event_source_set_priority(w->kill_timer, kCollectionPriority);
  sd_event_source_set_floating(w->kill_timer, 1);
  sd_event_source_unref(w->kill_timer);
}

void ExecdSource::close_pipes() {
  out_ = sd_event_source_disable_unref(out_);  // closes the fds (io_fd_own)
  err_ = sd_event_source_disable_unref(err_);
  if (throttle_timer_) sd_event_source_set_enabled(throttle_timer_, SD_EVENT_OFF);
}

int ExecdSource::on_child(sd_event_source* s, const siginfo_t* si, void* userdata) {
  auto* w = static_cast<Watch*>(userdata);
  return guarded("child", [&] {
    // The program is a zombie until this returns, so its process group id cannot be reused yet:
    // whatever it started dies with it, and a restart begins from a clean slate.
    ::kill(-w->pid, SIGKILL);
    ExecdSource* owner = w->owner;
    const bool was_stopping = w->counted;
    if (w->counted) {
      w->counted = false;
      --g_stopping;
    }
    if (w->kill_timer) sd_event_source_unref(w->kill_timer);  // floating: frees it
    if (owner) owner->child_ = nullptr;
    // sd-event reaps the child when this callback returns; without ownership, freeing the source
    // does not try to kill or wait for it again.
    sd_event_source_set_child_process_own(s, 0);
    sd_event_source_unref(s);  // w may be gone from here on
    if (owner) owner->child_exited(*si);
    if (was_stopping && g_stopping == 0 && g_on_all_stopped) {
      auto cb = g_on_all_stopped;
      cb();
    }
  });
}

void ExecdSource::child_exited(const siginfo_t& si) {
  read_stdout(true);  // what the program printed before it died still counts
  if (err_) read_stderr();
  if (!err_buf_.empty() && !err_discarding_) log_stderr(err_buf_);
  close_pipes();
  const std::string how = exit_text(si);
  ++status_.errors;
  status_.last_error = "the program " + how;
  const std::uint64_t ran = now_usec() - spawned_at_;
  if (waiting_ && !started_) {
    waiting_ = false;
    if (wait_timer_) sd_event_source_set_enabled(wait_timer_, SD_EVENT_OFF);
    complete({std::nullopt, "the program " + how + " before it printed a reading"});
    return;
  }
  if (!started_) return;
  log::FieldGuard field("TB_SOURCE", config_.name);
  spdlog::error("source '{}': {} (pid {}) {} after {}", config_.name, settings_.command.front(),
                pid_, how, format_duration(Millis(static_cast<std::int64_t>(ran / 1000))));
  if (ran >= usec(kHealthyRun)) backoff_.reset();
  schedule_restart();
}

int ExecdSource::on_stdout(sd_event_source*, int, std::uint32_t, void* userdata) {
  auto* self = static_cast<ExecdSource*>(userdata);
  return guarded("stdout", [&] { self->read_stdout(false); });
}

int ExecdSource::on_stderr(sd_event_source*, int, std::uint32_t, void* userdata) {
  auto* self = static_cast<ExecdSource*>(userdata);
  return guarded("stderr", [&] { self->read_stderr(); });
}

int ExecdSource::on_timer(sd_event_source* s, std::uint64_t, void* userdata) {
  auto* self = static_cast<ExecdSource*>(userdata);
  return guarded("timer", [&] { self->timer_fired(s); });
}

// One chunk per callback (the io source is level-triggered, so the loop comes back): other
// sources get their turn between chunks however fast the program writes. `final` (the program
// died) drains what is left in the pipe, bounded, and takes a last unterminated line too.
void ExecdSource::read_stdout(bool final) {
  if (!out_) return;
  const int fd = sd_event_source_get_io_fd(out_);
  char buf[16384];
  for (int chunk = 0; chunk < (final ? 8 : 1); ++chunk) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n > 0) {
      out_buf_.append(buf, static_cast<std::size_t>(n));
      pump(final);
      continue;
    }
    if (n < 0 && errno == EINTR) {
      --chunk;
      continue;
    }
    if (n < 0 && errno == EAGAIN) break;
    out_ = sd_event_source_disable_unref(out_);  // EOF or error: nothing more to read
    break;
  }
  if (final) {
    if (!discarding_ && !out_buf_.empty()) {
      const std::string tail = std::move(out_buf_);
      out_buf_.clear();
      handle_line(tail);
    }
    return;
  }
  if (out_ && !line_budget()) throttle();
}

// Hands the complete lines in the buffer to handle_line, within this second's budget unless
// `unlimited`. A line that grows past kMaxLine without a newline is dropped up to its newline.
void ExecdSource::pump(bool unlimited) {
  std::size_t pos = 0;
  for (;;) {
    const auto nl = out_buf_.find('\n', pos);
    if (discarding_) {
      if (nl == std::string::npos) {
        pos = out_buf_.size();
        break;
      }
      pos = nl + 1;
      discarding_ = false;
      continue;
    }
    if (nl == std::string::npos) {
      if (out_buf_.size() - pos > kMaxLine) {
        reject("a line longer than 64 KiB was discarded");
        pos = out_buf_.size();
        discarding_ = true;
      }
      break;
    }
    if (!unlimited && !line_budget()) break;
    ++window_lines_;
    handle_line(std::string_view(out_buf_).substr(pos, nl - pos));
    pos = nl + 1;
  }
  out_buf_.erase(0, pos);
}

bool ExecdSource::line_budget() {
  const std::uint64_t now = now_usec();
  if (now - window_start_ >= kSecond) {
    window_start_ = now;
    window_lines_ = 0;
  }
  return window_lines_ < kMaxLinesPerSecond;
}

// Out of budget: stop reading until the next second. The pipe fills and the program blocks in
// write() — it is slowed down, not fed to the loop.
void ExecdSource::throttle() {
  sd_event_source_set_enabled(out_, SD_EVENT_OFF);
  const std::uint64_t at = window_start_ + kSecond;
  if (!throttle_timer_) {
    if (sd_event_add_time(loop_, &throttle_timer_, CLOCK_BOOTTIME, at, 1000, &ExecdSource::on_timer,
                          this) < 0) {
      throttle_timer_ = nullptr;
      sd_event_source_set_enabled(out_, SD_EVENT_ON);  // unthrottled rather than stuck
      return;
    }
    sd_event_source_set_priority(throttle_timer_, kCollectionPriority);
  } else {
    sd_event_source_set_time(throttle_timer_, at);
  }
  sd_event_source_set_enabled(throttle_timer_, SD_EVENT_ONESHOT);
}

void ExecdSource::handle_line(std::string_view line) {
  line = trim(line);
  if (line.empty()) return;
  telemetry::Record rec;
  std::string error;
  if (!parse_output(line, &rec, &error)) {
    reject(error);
    return;
  }
  // Stamped when the line arrives, unless the program says when it measured.
  rec.ts_ms = wall_ms();
  const auto ts = std::find_if(rec.readings.begin(), rec.readings.end(),
                               [](const telemetry::Reading& r) { return r.key == "ts"; });
  if (ts != rec.readings.end()) {
    const auto* ms = std::get_if<std::int64_t>(&ts->value);
    if (!ms || *ms < kMinTsMs) {
      reject("\"ts\" must be an integer of milliseconds since 1970 (seconds are too small)");
      return;
    }
    rec.ts_ms = *ms;
    rec.readings.erase(ts);
  }
  rec.source = config_.name;
  if (rec.readings.empty()) return;  // only nulls: nothing to send this time
  if (waiting_) {
    waiting_ = false;
    if (wait_timer_) sd_event_source_set_enabled(wait_timer_, SD_EVENT_OFF);
    complete({rec, {}});  // the base accounts for it in status()
    if (!emit_) return;
  } else {
    status_.readings += rec.readings.size();
    status_.last_ts_ms = rec.ts_ms;
    status_.last_error.clear();
  }
  if (emit_) {
    auto emit = emit_;  // a copy: emit may stop this source
    emit(std::move(rec));
  }
}

void ExecdSource::reject(const std::string& error) {
  ++status_.errors;
  status_.last_error = "rejected a line: " + error;
  const std::uint64_t now = now_usec();
  if (reject_logged_ && now - reject_logged_at_ < usec(kRejectLogInterval)) {
    ++rejects_unlogged_;
    return;
  }
  log::FieldGuard field("TB_SOURCE", config_.name);
  if (rejects_unlogged_ > 0)
    spdlog::warn("source '{}': {} ({} more rejected line(s) not logged)", config_.name,
                 status_.last_error, rejects_unlogged_);
  else
    spdlog::warn("source '{}': {}", config_.name, status_.last_error);
  reject_logged_ = true;
  reject_logged_at_ = now;
  rejects_unlogged_ = 0;
}

// stderr is always drained (bounded per callback) so the program never blocks on it; lines go to
// the log, rate-limited.
void ExecdSource::read_stderr() {
  if (!err_) return;
  const int fd = sd_event_source_get_io_fd(err_);
  char buf[4096];
  for (int chunk = 0; chunk < 4; ++chunk) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) return;
    if (n <= 0) {
      err_ = sd_event_source_disable_unref(err_);
      return;
    }
    std::string_view data(buf, static_cast<std::size_t>(n));
    while (!data.empty()) {
      const auto nl = data.find('\n');
      const auto part = data.substr(0, nl);
      if (!err_discarding_) {
        err_buf_.append(
            part.substr(0, kMaxStderrLine + 1 - std::min(err_buf_.size(), kMaxStderrLine + 1)));
        if (err_buf_.size() > kMaxStderrLine && nl == std::string_view::npos) {
          log_stderr(err_buf_);  // cut; the rest of the line is dropped
          err_buf_.clear();
          err_discarding_ = true;
        }
      }
      if (nl == std::string_view::npos) break;
      if (!err_discarding_) log_stderr(err_buf_);
      err_buf_.clear();
      err_discarding_ = false;
      data.remove_prefix(nl + 1);
    }
  }
}

void ExecdSource::log_stderr(std::string_view line) {
  line = trim(line);
  if (line.empty()) return;
  log::FieldGuard field("TB_SOURCE", config_.name);
  const std::uint64_t now = now_usec();
  if (now - stderr_window_start_ >= usec(kStderrWindow)) {
    if (stderr_suppressed_ > 0)
      spdlog::warn("source '{}': {} stderr line(s) not logged (at most {} per {})", config_.name,
                   stderr_suppressed_, kStderrLinesPerWindow, format_duration(kStderrWindow));
    stderr_window_start_ = now;
    stderr_lines_ = 0;
    stderr_suppressed_ = 0;
  }
  if (stderr_lines_ >= kStderrLinesPerWindow) {
    ++stderr_suppressed_;
    return;
  }
  ++stderr_lines_;
  spdlog::warn("source '{}': stderr: {}", config_.name, printable(line, kMaxStderrLine));
}

void ExecdSource::timer_fired(sd_event_source* s) {
  if (s == restart_timer_) {
    if (started_ && !child_ && !spawn()) schedule_restart();
  } else if (s == throttle_timer_) {
    if (!out_) return;
    pump(false);
    if (line_budget())
      sd_event_source_set_enabled(out_, SD_EVENT_ON);
    else
      throttle();
  } else if (s == wait_timer_) {
    if (!waiting_) return;
    waiting_ = false;
    complete({std::nullopt, "printed no reading within " + format_duration(settings_.timeout)});
    if (!started_) terminate();
  }
}

void ExecdSource::begin() {
  waiting_ = true;
  const bool restart_pending =
      restart_timer_ && sd_event_source_get_enabled(restart_timer_, nullptr) > 0;
  if (!child_ && !restart_pending && !spawn()) {
    waiting_ = false;
    complete({std::nullopt, status_.last_error});
    return;
  }
  const std::uint64_t at = now_usec() + usec(settings_.timeout);
  if (!wait_timer_) {
    if (sd_event_add_time(loop_, &wait_timer_, CLOCK_BOOTTIME, at, 10000, &ExecdSource::on_timer,
                          this) < 0) {
      wait_timer_ = nullptr;
      waiting_ = false;
      complete({std::nullopt, "cannot create a timer"});
      return;
    }
    sd_event_source_set_priority(wait_timer_, kCollectionPriority);
  } else {
    sd_event_source_set_time(wait_timer_, at);
  }
  sd_event_source_set_enabled(wait_timer_, SD_EVENT_ONESHOT);
}

void ExecdSource::cancel() {
  waiting_ = false;
  if (wait_timer_) sd_event_source_set_enabled(wait_timer_, SD_EVENT_OFF);
  if (!started_) terminate();
}

}  // namespace tb::sources
