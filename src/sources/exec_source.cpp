#include "sources/exec_source.hpp"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/epoll.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <map>
#include <tuple>

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "sources/source_type.hpp"
#include "sources/text.hpp"
#include "util/log.hpp"
#include "util/units.hpp"

namespace tb::sources {

namespace {

constexpr const char* kDefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

std::string errno_text(int err) { return std::strerror(err); }

std::string signal_name(int sig) {
  if (const char* abbrev = sigabbrev_np(sig)) return std::string("SIG") + abbrev;
  return "signal " + std::to_string(sig);
}

// The child gets fds 0-2 by dup2; pipe ends that happen to be 0-2 (a daemon started with closed
// stdio) would be clobbered by those dup2s, so they move up first.
bool move_above_stdio(int* fd) {
  if (*fd > 2) return true;
  const int moved = fcntl(*fd, F_DUPFD_CLOEXEC, 3);
  if (moved < 0) return false;
  ::close(*fd);
  *fd = moved;
  return true;
}

bool sigchld_blocked() {
  sigset_t current;
  if (pthread_sigmask(SIG_BLOCK, nullptr, &current) != 0) return false;
  return sigismember(&current, SIGCHLD) == 1;
}

// Small RAII wrappers so that every early return in spawn() releases what it set up.
struct SpawnAttr {
  posix_spawnattr_t attr;
  SpawnAttr() { posix_spawnattr_init(&attr); }
  ~SpawnAttr() { posix_spawnattr_destroy(&attr); }
};
struct FileActions {
  posix_spawn_file_actions_t fa;
  FileActions() { posix_spawn_file_actions_init(&fa); }
  ~FileActions() { posix_spawn_file_actions_destroy(&fa); }
};
struct Pipe {
  int fd[2] = {-1, -1};
  ~Pipe() {
    for (int f : fd)
      if (f >= 0) ::close(f);
  }
  int release(int i) {
    const int f = fd[i];
    fd[i] = -1;
    return f;
  }
};

template <typename F>
int guarded(const char* what, F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    spdlog::error("internal error in an exec source {} callback: {}", what, e.what());
  } catch (...) {
    spdlog::error("internal error in an exec source {} callback", what);
  }
  return 0;
}

}  // namespace

struct ExecSource::Run {
  pid_t pid = 0;
  sd_event_source* child = nullptr;
  sd_event_source* out = nullptr;  // owns the read end of stdout
  sd_event_source* err = nullptr;  // owns the read end of stderr
  sd_event_source* timer = nullptr;
  std::string output;
  std::string errors;
  bool exited = false;
  int exit_code = 0;        // siginfo si_code: CLD_EXITED, CLD_KILLED, CLD_DUMPED
  int exit_status = 0;      // exit status or signal number
  bool out_eof = false;     // stdout reached EOF: nothing of the group holds it any more
  bool out_closed = false;  // we stopped reading stdout (EOF, overflow, timeout)
  std::string failure;      // our verdict (timeout, overflow); wins over the exit status
  int phase = 0;            // timer: 0 = timeout pending, 1 = SIGTERM sent, 2 = SIGKILL sent
};

bool parse_output(std::string_view output, telemetry::Record* record, std::string* error) {
  const auto text = trim(output);
  if (text.empty()) {
    *error = "produced no output";
    return false;
  }
  // ordered_json keeps the program's key order, which --test shows back to the user.
  const auto j = nlohmann::ordered_json::parse(text.begin(), text.end(), nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    *error = "output is not a JSON object: " + printable(text);
    return false;
  }
  std::vector<telemetry::Reading> readings;
  readings.reserve(j.size());
  for (const auto& [key, v] : j.items()) {
    if (key.empty()) {
      *error = "output has an empty key";
      return false;
    }
    const std::string shown = "'" + printable(key) + "'";
    switch (v.type()) {
      case nlohmann::ordered_json::value_t::null:
        continue;  // "no value this time": skipped, not an error
      case nlohmann::ordered_json::value_t::boolean:
        readings.push_back({key, v.get<bool>()});
        break;
      case nlohmann::ordered_json::value_t::number_integer:
        readings.push_back({key, v.get<std::int64_t>()});
        break;
      case nlohmann::ordered_json::value_t::number_unsigned: {
        const auto u = v.get<std::uint64_t>();
        if (u <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
          readings.push_back({key, static_cast<std::int64_t>(u)});
        else
          readings.push_back({key, static_cast<double>(u)});
        break;
      }
      case nlohmann::ordered_json::value_t::number_float: {
        const double d = v.get<double>();
        if (!std::isfinite(d)) {
          *error = "value of " + shown + " is out of range";
          return false;
        }
        readings.push_back({key, d});
        break;
      }
      case nlohmann::ordered_json::value_t::string:
        readings.push_back({key, v.get<std::string>()});
        break;
      default:
        *error = "value of " + shown + " is " + (v.is_array() ? "an array" : "an object") +
                 "; values must be numbers, booleans, strings or null";
        return false;
    }
  }
  record->readings = std::move(readings);
  return true;
}

namespace {

using config::Need;
using P = ProgramSettings;

// env: NAME: value pairs. Values are never quoted back (they may hold credentials).
std::optional<std::map<std::string, std::string>> read_env(const config::Field& f) {
  const config::Value::Map* map = f.value.map();
  if (!map) {
    f.error("expected a map of NAME: value, not " + std::string(config::kind(f.value)));
    return std::nullopt;
  }
  std::map<std::string, std::string> env;
  bool ok = true;
  for (const config::Value::Entry& e : *map) {
    const std::string& n = e.first;
    const config::Value& value = e.second;
    const std::string path = f.path + "." + n;
    const bool valid = !n.empty() && !std::isdigit(static_cast<unsigned char>(n.front())) &&
                       std::all_of(n.begin(), n.end(), [](char c) {
                         return std::isalnum(static_cast<unsigned char>(c)) || c == '_';
                       });
    if (!valid) {
      f.report.error(e.key_position, f.path + ": " + config::shown(n) +
                                         " is not a variable name (letters, digits and _, not "
                                         "starting with a digit)");
      ok = false;
    } else if (env.count(n)) {
      f.report.error(e.key_position, path + ": listed twice");
      ok = false;
    } else if (!value.is_scalar()) {
      f.report.error(value.is_null() ? e.key_position : value.position,
                     path + ": expected a string, not " + config::kind(value));
      ok = false;
    } else if (value.text.find('\0') != std::string::npos) {
      f.report.error(value.position, path + ": must not contain a NUL character");
      ok = false;
    } else {
      env.emplace(n, value.text);
    }
  }
  if (!ok) return std::nullopt;
  return env;
}

}  // namespace

// exec and execd share it.
const config::Keys<ProgramSettings> kProgramKeys = {
    {"command", Need::Required, "list of strings", "",
     config::into(&P::command, config::program_argv()),
     "The program and its arguments (argv); no shell."},
    {"timeout", Need::Optional, "duration, at least 100ms", "5s",
     config::into(&P::timeout, config::duration(Millis(100), Millis::max())),
     "exec: how long a run may take; execd: how long --test waits for the first line."},
    {"env", Need::Optional, "map of NAME: value", "", config::into(&P::env, read_env),
     "Variables added to the program's small environment."},
    {"working_directory", Need::Optional, "absolute path", "/",
     config::into(&P::working_directory, config::text(config::check_absolute)),
     "The program's working directory; must exist."},
};

const SourceType& ExecSource::declaration() {
  static const SourceType type =
      declare<ProgramSettings>("exec", Collection::Periodic, kProgramKeys, &ExecSource::create,
                               [](const CheckContext& c, P& s) { fit_timeout(c, s.timeout); });
  return type;
}

std::string check_program(const ProgramSettings& settings) {
  if (settings.command.empty() || settings.command.front().empty()) return "command is empty";
  if (settings.timeout.count() <= 0) return "timeout must be positive";
  return check_working_directory(settings.working_directory);
}

SourcePtr ExecSource::create(sd_event* loop, const config::SourceConfig& config,
                             std::string* error) {
  if (std::string e = check_program(*config::settings_of<ProgramSettings>(config)); !e.empty()) {
    *error = std::move(e);
    return nullptr;
  }
  return SourcePtr(new ExecSource(loop, config));
}

ExecSource::ExecSource(sd_event* loop, config::SourceConfig config)
    : Source(loop, std::move(config), "exec"),
      settings_(static_cast<const ProgramSettings&>(*config_.settings)),
      env_(program_environment(config_.name, settings_)) {}

ExecSource::~ExecSource() { cancel(); }

pid_t ExecSource::child_pid() const { return run_ && !run_->exited ? run_->pid : 0; }

void ExecSource::begin() {
  std::string err = spawn();
  if (!err.empty()) complete({std::nullopt, std::move(err)});
}

std::vector<std::string> program_environment(const std::string& source_name,
                                             const ProgramSettings& settings) {
  // A small, predictable environment instead of the agent's: programs behave the same under
  // systemd, from a shell and in tests, and nothing of the agent's (credentials paths, tokens in
  // variables) leaks into them. LANG=C keeps decimal points '.', as JSON needs.
  std::map<std::string, std::string> vars;
  const char* path = std::getenv("PATH");
  vars["PATH"] = path && *path ? path : kDefaultPath;
  vars["LANG"] = "C";
  vars["TB_AGENT_SOURCE"] = source_name;
  for (const char* name : {"TZ", "CREDENTIALS_DIRECTORY"})
    if (const char* v = std::getenv(name)) vars[name] = v;
  for (const auto& [name, value] : settings.env) vars[name] = value;
  std::vector<std::string> env;
  for (const auto& [name, value] : vars) env.push_back(name + "=" + value);
  return env;
}

std::string check_working_directory(const std::string& dir) {
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) return "working_directory " + dir + ": " + errno_text(errno);
  if (!S_ISDIR(st.st_mode)) return "working_directory " + dir + " is not a directory";
  return {};
}

std::string spawn_program(const std::vector<std::string>& command,
                          const std::vector<std::string>& env, const std::string& working_directory,
                          SpawnedProgram* out_program) {
  const std::string& program = command.front();
  // Without SIGCHLD blocked sd_event_add_child refuses, and we would have a child nobody reaps.
  if (!sigchld_blocked())
    return "cannot watch " + program + ": SIGCHLD is not blocked in the agent (internal error)";

  Pipe out, err;
  if (pipe2(out.fd, O_CLOEXEC) < 0 || pipe2(err.fd, O_CLOEXEC) < 0)
    return "cannot create a pipe: " + errno_text(errno);
  for (int* fd : {&out.fd[0], &out.fd[1], &err.fd[0], &err.fd[1]})
    if (!move_above_stdio(fd)) return "cannot create a pipe: " + errno_text(errno);
  // Only our ends are non-blocking: O_NONBLOCK is shared by everyone holding the same end, and
  // a program whose stdout write fails with EAGAIN would be broken.
  for (int fd : {out.fd[0], err.fd[0]}) fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);

  FileActions fa;
  posix_spawn_file_actions_adddup2(&fa.fa, out.fd[1], 1);
  posix_spawn_file_actions_adddup2(&fa.fa, err.fd[1], 2);
  posix_spawn_file_actions_addopen(&fa.fa, 0, "/dev/null", O_RDONLY, 0);
  // Whatever else the agent has open (sockets, the queue database) stays out of the program even
  // if some library forgot O_CLOEXEC.
  posix_spawn_file_actions_addclosefrom_np(&fa.fa, 3);
  posix_spawn_file_actions_addchdir_np(&fa.fa,
                                       working_directory.empty() ? "/" : working_directory.c_str());

  SpawnAttr attr;
  // The agent blocks SIGCHLD, SIGTERM, SIGHUP… for signalfd; a program must start with a clean
  // mask and default dispositions. Its own process group lets timeouts reach whatever it starts.
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  posix_spawnattr_setsigmask(&attr.attr, &none);
  posix_spawnattr_setsigdefault(&attr.attr, &all);
  posix_spawnattr_setpgroup(&attr.attr, 0);
  posix_spawnattr_setflags(&attr.attr,
                           POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP);

  std::vector<char*> argv;
  for (const auto& a : command) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  std::vector<char*> envp;
  for (const auto& e : env) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);

  pid_t pid = 0;
  // glibc's posix_spawn reports exec failures (ENOENT, EACCES) as its return value. A name
  // without '/' is looked up in the agent's PATH.
  const bool search = program.find('/') == std::string::npos;
  const int rc =
      search ? posix_spawnp(&pid, program.c_str(), &fa.fa, &attr.attr, argv.data(), envp.data())
             : posix_spawn(&pid, program.c_str(), &fa.fa, &attr.attr, argv.data(), envp.data());
  if (rc != 0) return "cannot run " + program + ": " + errno_text(rc);
  ::close(out.release(1));
  ::close(err.release(1));
  out_program->pid = pid;
  out_program->stdout_fd = out.release(0);
  out_program->stderr_fd = err.release(0);
  return {};
}

std::string ExecSource::spawn() {
  const std::string& program = settings_.command.front();
  SpawnedProgram spawned;
  if (std::string e = spawn_program(settings_.command, env_, settings_.working_directory, &spawned);
      !e.empty())
    return e;
  const pid_t pid = spawned.pid;
  Pipe out, err;
  out.fd[0] = spawned.stdout_fd;
  err.fd[0] = spawned.stderr_fd;

  run_ = std::make_unique<Run>();
  run_->pid = pid;
  int r = sd_event_add_child(loop_, &run_->child, pid, WEXITED, &ExecSource::on_child, this);
  if (r < 0) {
    run_->child = nullptr;
    // Just spawned, so it cannot be stuck anywhere yet: kill and reap it right here.
    ::kill(pid, SIGKILL);
    while (waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
    }
    run_.reset();
    return "cannot watch " + program + ": " + errno_text(-r);
  }
  // If the loop is freed while the program runs, sd-event kills and reaps it.
  sd_event_source_set_child_process_own(run_->child, 1);
  sd_event_source_set_priority(run_->child, kCollectionPriority);

  std::string failure;
  for (auto [src, fd, cb] : {std::tuple{&run_->out, out.release(0), &ExecSource::on_stdout},
                             std::tuple{&run_->err, err.release(0), &ExecSource::on_stderr}}) {
    r = sd_event_add_io(loop_, src, fd, EPOLLIN, cb, this);
    if (r < 0) {
      *src = nullptr;
      ::close(fd);
      if (failure.empty())
        failure = "cannot watch the output of " + program + ": " + errno_text(-r);
      continue;
    }
    sd_event_source_set_io_fd_own(*src, 1);
    sd_event_source_set_priority(*src, kCollectionPriority);
  }
  const std::uint64_t timeout = static_cast<std::uint64_t>(settings_.timeout.count()) * 1000;
  r = sd_event_add_time_relative(loop_, &run_->timer, CLOCK_BOOTTIME, timeout,
                                 std::clamp<std::uint64_t>(timeout / 20, 1, 100000),
                                 &ExecSource::on_timer, this);
  if (r < 0) {
    run_->timer = nullptr;
    if (failure.empty()) failure = "cannot create a timer: " + errno_text(-r);
  } else {
    sd_event_source_set_priority(run_->timer, kCollectionPriority);
  }
  if (!failure.empty()) {
    cancel();
    return failure;
  }
  spdlog::debug("source '{}': started {} (pid {})", config_.name, program, pid);
  return {};
}

int ExecSource::on_child(sd_event_source* s, const siginfo_t* si, void* userdata) {
  if (!userdata) {
    // A cancelled run's child, handed to the loop to be reaped (release_child): sd-event reaps it
    // when this returns; ownership is dropped so freeing the source does not wait on it again.
    sd_event_source_set_child_process_own(s, 0);
    sd_event_source_unref(s);
    return 0;
  }
  auto* self = static_cast<ExecSource*>(userdata);
  return guarded("child", [&] { self->child_exited(*si); });
}

int ExecSource::on_stdout(sd_event_source*, int, std::uint32_t, void* userdata) {
  auto* self = static_cast<ExecSource*>(userdata);
  return guarded("stdout", [&] { self->read_stdout(); });
}

int ExecSource::on_stderr(sd_event_source*, int, std::uint32_t, void* userdata) {
  auto* self = static_cast<ExecSource*>(userdata);
  return guarded("stderr", [&] { self->read_stderr(); });
}

int ExecSource::on_timer(sd_event_source*, std::uint64_t, void* userdata) {
  auto* self = static_cast<ExecSource*>(userdata);
  return guarded("timer", [&] { self->timer_fired(); });
}

void ExecSource::child_exited(const siginfo_t& si) {
  if (!run_) return;
  run_->exited = true;
  run_->exit_code = si.si_code;
  run_->exit_status = si.si_status;
  // sd-event reaps the child right after this callback returns; the source is no longer needed,
  // and without ownership freeing it will not try to kill or wait for the pid again.
  sd_event_source_set_child_process_own(run_->child, 0);
  run_->child = sd_event_source_disable_unref(run_->child);
  finish_if_done();
}

void ExecSource::read_stdout() {
  if (!run_ || !run_->out) return;
  const int fd = sd_event_source_get_io_fd(run_->out);
  char buf[16384];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n > 0) {
      // The cap bounds this loop too: a program writing without pause cannot starve the loop.
      if (run_->output.size() + static_cast<std::size_t>(n) > kMaxOutput) {
        fail("output exceeds 64 KiB", SIGKILL);
        return;
      }
      run_->output.append(buf, static_cast<std::size_t>(n));
      continue;
    }
    if (n == 0) {
      run_->out_eof = true;
      close_stdout();
      finish_if_done();
      return;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN) return;
    fail("cannot read the output: " + errno_text(errno), SIGKILL);
    return;
  }
}

void ExecSource::read_stderr() {
  if (!run_ || !run_->err) return;
  const int fd = sd_event_source_get_io_fd(run_->err);
  char buf[4096];
  // Bounded per call; the excess is read and dropped so the program never blocks on stderr.
  for (int i = 0; i < 64; ++i) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n > 0) {
      const std::size_t room = kMaxStderr - std::min(kMaxStderr, run_->errors.size());
      run_->errors.append(buf, std::min(room, static_cast<std::size_t>(n)));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) return;
    run_->err = sd_event_source_disable_unref(run_->err);  // EOF or error: done with stderr
    return;
  }
}

void ExecSource::timer_fired() {
  if (!run_) return;
  auto& run = *run_;
  switch (run.phase) {
    case 0:
      if (run.failure.empty()) {
        run.failure = "timed out after " + format_duration(settings_.timeout);
        if (run.exited && !run.out_eof)
          run.failure += " (the program exited, but a process it started kept stdout open)";
      }
      signal_group(SIGTERM);
      break;
    case 1:
      signal_group(SIGKILL);
      break;
    default:
      // SIGKILL did not end it within the grace: it is stuck in the kernel (a hung driver, NFS).
      // Report now and let the loop reap it whenever it dies.
      spdlog::warn("source '{}': pid {} did not die after SIGKILL; it is reaped when it does",
                   config_.name, run.pid);
      end({std::nullopt, run.failure});
      return;
  }
  ++run.phase;
  close_stdout();
  close_stderr();
  sd_event_source_set_time_relative(run.timer,
                                    static_cast<std::uint64_t>(kKillGrace.count()) * 1000);
  sd_event_source_set_enabled(run.timer, SD_EVENT_ONESHOT);
  finish_if_done();
}

void ExecSource::fail(std::string error, int signal) {
  if (run_->failure.empty()) run_->failure = std::move(error);
  signal_group(signal);
  close_stdout();
  close_stderr();
  finish_if_done();
}

void ExecSource::signal_group(int sig) {
  auto& run = *run_;
  if (!run.exited) {
    // The group first (helpers it started), then the program itself through its pidfd in case
    // it left the group; the pidfd cannot hit a recycled pid.
    ::kill(-run.pid, sig);
    if (run.child) sd_event_source_send_child_signal(run.child, sig, nullptr, 0);
  } else if (!run.out_eof) {
    // The program is gone but something holds its stdout: a member of its group, which keeps
    // the group id in use, so it cannot belong to anyone else.
    ::kill(-run.pid, sig);
  }
}

void ExecSource::close_stdout() {
  if (!run_) return;
  run_->out = sd_event_source_disable_unref(run_->out);  // closes the fd (io_fd_own)
  run_->out_closed = true;
}

void ExecSource::close_stderr() {
  if (!run_ || !run_->err) return;
  read_stderr();  // what is already there may explain the failure
  run_->err = sd_event_source_disable_unref(run_->err);
}

void ExecSource::finish_if_done() {
  if (!run_ || !run_->exited || !run_->out_closed) return;
  // stderr is not waited for: a helper may keep it open; what is there now is what we report.
  close_stderr();
  end(verdict());
}

Collected ExecSource::verdict() {
  auto& run = *run_;
  if (!run.errors.empty()) {
    log::FieldGuard field("TB_SOURCE", config_.name);
    spdlog::debug("source '{}': stderr: {}", config_.name, printable(trim(run.errors), kMaxStderr));
  }
  if (!run.failure.empty()) return {std::nullopt, run.failure};
  const std::string line = first_line(run.errors);
  const std::string detail = line.empty() ? "" : ": " + line;
  if (run.exit_code == CLD_EXITED && run.exit_status != 0)
    return {std::nullopt, "exited with status " + std::to_string(run.exit_status) + detail};
  if (run.exit_code == CLD_KILLED || run.exit_code == CLD_DUMPED)
    return {std::nullopt, "killed by signal " + signal_name(run.exit_status) + detail};
  telemetry::Record rec;
  std::string error;
  if (!parse_output(run.output, &rec, &error)) {
    if (error == "produced no output") error += detail;
    return {std::nullopt, std::move(error)};
  }
  // Stamped when the output is complete: that is when the values were read (the program may
  // spend most of its time before measuring, e.g. waking a sensor).
  rec.ts_ms = wall_ms();
  rec.source = config_.name;
  return {std::move(rec), {}};
}

void ExecSource::end(Collected c) {
  release_child();
  run_->timer = sd_event_source_disable_unref(run_->timer);
  run_->out = sd_event_source_disable_unref(run_->out);
  run_->err = sd_event_source_disable_unref(run_->err);
  run_.reset();
  complete(std::move(c));
}

void ExecSource::release_child() {
  sd_event_source* child = run_->child;
  run_->child = nullptr;
  if (!child) return;
  // Still running (or exited, not yet dispatched): the loop keeps the source (floating) and
  // reaps the child when it has died; on_child sees no userdata and just lets go.
  sd_event_source_set_userdata(child, nullptr);
  sd_event_source_set_floating(child, 1);
  sd_event_source_unref(child);
}

void ExecSource::cancel() {
  if (!run_) return;
  signal_group(SIGKILL);
  run_->timer = sd_event_source_disable_unref(run_->timer);
  run_->out = sd_event_source_disable_unref(run_->out);
  run_->err = sd_event_source_disable_unref(run_->err);
  release_child();
  run_.reset();
}

}  // namespace tb::sources
