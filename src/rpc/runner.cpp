#include "rpc/runner.hpp"

#include <signal.h>
#include <sys/epoll.h>
#include <sys/wait.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "sources/exec_source.hpp"

namespace tb::rpc {

struct CommandRunner::Impl {
  sd_event* loop = nullptr;
  std::function<void(const CommandResult&)> done;
  CommandResult result;
  pid_t pid = 0;
  sd_event_source* child = nullptr;
  sd_event_source* out = nullptr;
  sd_event_source* err = nullptr;
  sd_event_source* timer = nullptr;
  sd_event_source* later = nullptr;  // reports a failure to start from the loop
  bool exited = false;

  ~Impl() {
    if (pid > 0 && !exited) ::kill(-pid, SIGKILL);
    for (auto* s : {out, err, timer, later}) sd_event_source_disable_unref(s);
    // sd-event kills (SIGKILL) and reaps a child whose source is freed while it runs.
    if (child) {
      sd_event_source_set_child_process_own(child, 1);
      sd_event_source_disable_unref(child);
    }
  }

  void read_into(int fd, std::string& into, std::size_t cap, bool is_stdout,
                 sd_event_source*& src) {
    char buf[4096];
    for (int i = 0; i < 16; ++i) {
      const ssize_t n = ::read(fd, buf, sizeof buf);
      if (n > 0) {
        const std::size_t room = cap > into.size() ? cap - into.size() : 0;
        into.append(buf, std::min<std::size_t>(room, static_cast<std::size_t>(n)));
        if (is_stdout && static_cast<std::size_t>(n) > room) result.truncated = true;
        continue;
      }
      if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
      src = sd_event_source_disable_unref(src);  // EOF or error: done with it
      finish_if_done();
      return;
    }
  }

  void finish_if_done() {
    if (!exited || out || err || !done) return;
    sd_event_source_set_enabled(timer, SD_EVENT_OFF);
    auto d = std::move(done);
    done = nullptr;
    d(result);  // may destroy us: nothing after this
  }

  static int on_out(sd_event_source*, int fd, uint32_t, void* u) noexcept {
    auto* self = static_cast<Impl*>(u);
    try {
      self->read_into(fd, self->result.output, kMaxOutput, true, self->out);
    } catch (...) {
    }
    return 0;
  }
  static int on_err(sd_event_source*, int fd, uint32_t, void* u) noexcept {
    auto* self = static_cast<Impl*>(u);
    try {
      self->read_into(fd, self->result.errors, kMaxStderr, false, self->err);
    } catch (...) {
    }
    return 0;
  }
  static int on_child(sd_event_source*, const siginfo_t* si, void* u) noexcept {
    auto* self = static_cast<Impl*>(u);
    try {
      self->exited = true;
      if (si->si_code == CLD_EXITED) {
        self->result.exit_code = si->si_status;
      } else {
        self->result.signal = si->si_status;
      }
      // A helper the program left behind may keep the pipes open: they are not waited for.
      if (self->out)
        self->read_into(sd_event_source_get_io_fd(self->out), self->result.output, kMaxOutput, true,
                        self->out);
      self->out = sd_event_source_disable_unref(self->out);
      self->err = sd_event_source_disable_unref(self->err);
      self->finish_if_done();
    } catch (...) {
    }
    return 0;
  }
  static int on_timeout(sd_event_source*, uint64_t, void* u) noexcept {
    auto* self = static_cast<Impl*>(u);
    self->result.timed_out = true;
    if (self->pid > 0 && !self->exited) ::kill(-self->pid, SIGKILL);
    return 0;
  }
  static int on_later(sd_event_source*, void* u) noexcept {
    auto* self = static_cast<Impl*>(u);
    try {
      auto d = std::move(self->done);
      self->done = nullptr;
      if (d) d(self->result);
    } catch (...) {
    }
    return 0;
  }

  void fail_later(std::string why) {
    result.error = std::move(why);
    sd_event_add_defer(loop, &later, &Impl::on_later, this);
  }
};

CommandRunner::CommandRunner(sd_event* loop, const std::vector<std::string>& command,
                             Millis timeout, std::function<void(const CommandResult&)> done)
    : impl_(std::make_unique<Impl>()) {
  Impl& im = *impl_;
  im.loop = loop;
  im.done = std::move(done);
  std::vector<std::string> env = {"LANG=C"};
  const char* path = std::getenv("PATH");
  env.push_back(
      std::string("PATH=") +
      (path && *path ? path : "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"));
  sources::SpawnedProgram p;
  if (std::string e = sources::spawn_program(command, env, "/", &p); !e.empty()) {
    im.fail_later(std::move(e));
    return;
  }
  im.pid = p.pid;
  im.result.started = true;
  int r = sd_event_add_child(loop, &im.child, p.pid, WEXITED, &Impl::on_child, &im);
  if (r < 0) {
    ::kill(-p.pid, SIGKILL);
    ::close(p.stdout_fd);
    ::close(p.stderr_fd);
    im.exited = true;  // reaped by nobody we know of: sd-event was refused; report and move on
    im.result.started = false;
    im.fail_later(std::string("cannot watch the program: ") + std::strerror(-r));
    return;
  }
  sd_event_add_io(loop, &im.out, p.stdout_fd, EPOLLIN, &Impl::on_out, &im);
  sd_event_source_set_io_fd_own(im.out, 1);
  sd_event_add_io(loop, &im.err, p.stderr_fd, EPOLLIN, &Impl::on_err, &im);
  sd_event_source_set_io_fd_own(im.err, 1);
  sd_event_add_time_relative(
      loop, &im.timer, CLOCK_MONOTONIC,
      static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(timeout).count()),
      10'000, &Impl::on_timeout, &im);
}

CommandRunner::~CommandRunner() = default;

}  // namespace tb::rpc
