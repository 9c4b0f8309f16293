#include "net/resolver.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>

#include <spdlog/spdlog.h>

#include "util/units.hpp"

namespace tb::net {

namespace {

// The child's answer, one write() of at most kAnswerMax bytes: atomic and never blocking on a
// fresh pipe (PIPE_BUF is 4096 on Linux, pipe(7)), so the child cannot hang on a full pipe.
//   'A' n (len sockaddr){n}     addresses
//   'E' int32 gai int32 errno   getaddrinfo's failure
constexpr std::size_t kAnswerMax = 4096;
static_assert(1 + 1 + Resolver::kMaxAddresses * (1 + sizeof(sockaddr_in6)) <= kAnswerMax);

bool sigchld_blocked() {
  sigset_t current;
  if (pthread_sigmask(SIG_BLOCK, nullptr, &current) != 0) return false;
  return sigismember(&current, SIGCHLD) == 1;
}

std::string gai_text(int gai, int err) {
  if (gai == EAI_SYSTEM) return std::strerror(err);
  return gai_strerror(gai);
}

// getaddrinfo for UDP. AI_ADDRCONFIG hides loopback-only hosts on a machine without a configured
// address; without it the answer may name a family we cannot reach, so it is the fallback only.
int getaddrinfo_udp(const char* host, const char* port, int extra_flags, addrinfo** res) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_DGRAM;
  hints.ai_flags = AI_ADDRCONFIG | AI_NUMERICSERV | extra_flags;
  int gai = getaddrinfo(host, port, &hints, res);
  if (gai != 0 || !*res) {
    if (*res) freeaddrinfo(*res);
    *res = nullptr;
    hints.ai_flags = AI_NUMERICSERV | extra_flags;
    gai = getaddrinfo(host, port, &hints, res);
  }
  return gai;
}

std::vector<Address> to_addresses(const addrinfo* res) {
  std::vector<Address> out;
  for (const addrinfo* ai = res; ai && out.size() < Resolver::kMaxAddresses; ai = ai->ai_next) {
    if (ai->ai_addrlen == 0 || ai->ai_addrlen > sizeof(sockaddr_storage)) continue;
    Address a;
    std::memcpy(&a.storage, ai->ai_addr, ai->ai_addrlen);
    a.length = ai->ai_addrlen;
    out.push_back(a);
  }
  return out;
}

// Runs in the forked child: no allocation of our own, no logging, no return.
[[noreturn]] void child_main(pid_t parent, int out, const char* host, const char* port) {
  // Die with the agent (even kill -9) instead of lingering in a DNS wait.
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() != parent) _exit(1);  // it died before prctl
  // Nothing of the agent's (sockets, the queue database, other lookups' pipes) stays open here.
  if (out > 3) close_range(3, static_cast<unsigned>(out) - 1, 0);
  close_range(static_cast<unsigned>(out) + 1, ~0U, 0);

  unsigned char buf[kAnswerMax];
  std::size_t len = 0;
  addrinfo* res = nullptr;
  errno = 0;
  const int gai = getaddrinfo_udp(host, port, 0, &res);
  const int err = errno;
  if (gai == 0 && res) {
    buf[len++] = 'A';
    const std::size_t count_at = len++;
    unsigned char count = 0;
    for (const addrinfo* ai = res; ai && count < Resolver::kMaxAddresses; ai = ai->ai_next) {
      if (ai->ai_addrlen == 0 || ai->ai_addrlen > sizeof(sockaddr_in6)) continue;
      buf[len++] = static_cast<unsigned char>(ai->ai_addrlen);
      std::memcpy(buf + len, ai->ai_addr, ai->ai_addrlen);
      len += ai->ai_addrlen;
      ++count;
    }
    buf[count_at] = count;
  } else {
    buf[len++] = 'E';
    const std::int32_t codes[2] = {gai == 0 ? EAI_NONAME : gai, err};
    std::memcpy(buf + len, codes, sizeof(codes));
    len += sizeof(codes);
  }
  ssize_t n;
  do {
    n = write(out, buf, len);
  } while (n < 0 && errno == EINTR);
  _exit(n == static_cast<ssize_t>(len) ? 0 : 1);
}

Resolution parse_answer(const unsigned char* buf, std::size_t len) {
  Resolution r;
  if (len >= 1 + 2 * sizeof(std::int32_t) && buf[0] == 'E') {
    std::int32_t codes[2];
    std::memcpy(codes, buf + 1, sizeof(codes));
    r.error = gai_text(codes[0], codes[1]);
    return r;
  }
  if (len >= 2 && buf[0] == 'A') {
    std::size_t pos = 2;
    for (unsigned i = 0; i < buf[1] && pos < len; ++i) {
      const std::size_t alen = buf[pos++];
      if (alen == 0 || alen > sizeof(sockaddr_storage) || pos + alen > len) break;
      Address a;
      std::memcpy(&a.storage, buf + pos, alen);
      a.length = static_cast<socklen_t>(alen);
      pos += alen;
      if (a.storage.ss_family == AF_INET || a.storage.ss_family == AF_INET6)
        r.addresses.push_back(a);
    }
    if (!r.addresses.empty()) return r;
  }
  r.error = "the resolver process gave no usable answer";
  return r;
}

template <typename F>
int guarded(const char* what, F&& f) noexcept {
  try {
    f();
  } catch (const std::exception& e) {
    spdlog::error("resolver: {} handler: {}", what, e.what());
  } catch (...) {
    spdlog::error("resolver: {} handler failed", what);
  }
  return 0;
}

}  // namespace

std::string to_string(const Address& a) {
  char host[INET6_ADDRSTRLEN] = {};
  if (a.storage.ss_family == AF_INET) {
    const auto* in = reinterpret_cast<const sockaddr_in*>(&a.storage);
    inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
    return std::string(host) + ":" + std::to_string(ntohs(in->sin_port));
  }
  if (a.storage.ss_family == AF_INET6) {
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(&a.storage);
    inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
    return "[" + std::string(host) + "]:" + std::to_string(ntohs(in6->sin6_port));
  }
  return "?";
}

struct Resolver::Lookup {
  Callback callback;
  Millis timeout{0};
  pid_t pid = 0;
  int fd = -1;  // read end of the child's pipe
  sd_event_source* child = nullptr;
  sd_event_source* timer = nullptr;
  sd_event_source* defer = nullptr;  // delivers `early` from the loop
  Resolution early;

  ~Lookup() {
    // The child source owns the process: freeing it SIGKILLs and reaps the child (sd-event's
    // sd_event_source_set_child_process_own), so a canceled lookup leaves no zombie.
    sd_event_source_disable_unref(child);
    sd_event_source_disable_unref(timer);
    sd_event_source_disable_unref(defer);
    if (fd >= 0) ::close(fd);
  }
};

Resolver::Resolver(sd_event* loop) : loop_(sd_event_ref(loop)) {}

Resolver::~Resolver() {
  cancel();
  sd_event_unref(loop_);
}

void Resolver::cancel() {
  delete lookup_;
  lookup_ = nullptr;
}

bool Resolver::busy() const { return lookup_ != nullptr; }

int Resolver::child_pid() const { return lookup_ && lookup_->child ? lookup_->pid : 0; }

void Resolver::resolve(const std::string& host, std::uint16_t port, Millis timeout,
                       Callback callback) {
  cancel();
  auto lookup = std::make_unique<Lookup>();
  lookup->callback = std::move(callback);
  lookup->timeout = timeout;
  const std::string port_text = std::to_string(port);

  // Answers the loop delivers without a child: numeric addresses (getaddrinfo never blocks on
  // AI_NUMERICHOST) and set-up failures.
  auto deliver_later = [&](Resolution r) {
    lookup->early = std::move(r);
    const int rc = sd_event_add_defer(loop_, &lookup->defer, &Resolver::on_defer, this);
    if (rc < 0) throw std::runtime_error(std::string("sd_event_add_defer: ") + std::strerror(-rc));
    sd_event_source_set_description(lookup->defer, "resolver-answer");
    lookup_ = lookup.release();
  };

  addrinfo* res = nullptr;
  if (getaddrinfo_udp(host.c_str(), port_text.c_str(), AI_NUMERICHOST, &res) == 0 && res) {
    Resolution r;
    r.addresses = to_addresses(res);
    freeaddrinfo(res);
    return deliver_later(std::move(r));
  }
  if (res) freeaddrinfo(res);
  auto failed = [&](std::string why) {
    Resolution r;
    r.error = std::move(why);
    deliver_later(std::move(r));
  };
  // Without SIGCHLD blocked sd_event_add_child refuses, and nobody would reap the child.
  if (!sigchld_blocked())
    return failed("cannot resolve in the background: SIGCHLD is not blocked (internal error)");

  int fds[2];
  if (pipe2(fds, O_CLOEXEC) < 0) return failed(std::string("pipe: ") + std::strerror(errno));
  // Only our end is non-blocking; the child's single write fits the empty pipe anyway.
  fcntl(fds[0], F_SETFL, fcntl(fds[0], F_GETFL) | O_NONBLOCK);
  // fork without exec is safe here: the agent has one thread (architecture.md), so no lock can be
  // held by a thread that does not exist in the child.
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) {
    const int err = errno;
    ::close(fds[0]);
    ::close(fds[1]);
    return failed(std::string("fork: ") + std::strerror(err));
  }
  if (pid == 0) {
    ::close(fds[0]);
    child_main(parent, fds[1], host.c_str(), port_text.c_str());
  }
  ::close(fds[1]);
  lookup->pid = pid;
  lookup->fd = fds[0];
  int rc = sd_event_add_child(loop_, &lookup->child, pid, WEXITED, &Resolver::on_child, this);
  if (rc < 0) {
    lookup->child = nullptr;
    ::kill(pid, SIGKILL);
    while (waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
    }
    return failed(std::string("cannot watch the resolver process: ") + std::strerror(-rc));
  }
  sd_event_source_set_child_process_own(lookup->child, 1);
  sd_event_source_set_description(lookup->child, "resolver-child");
  const auto usec = static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::microseconds>(timeout).count());
  rc = sd_event_add_time_relative(loop_, &lookup->timer, CLOCK_MONOTONIC, usec, 10000,
                                  &Resolver::on_timeout, this);
  if (rc < 0) {
    lookup->timer = nullptr;
    lookup->child = sd_event_source_disable_unref(lookup->child);  // kills and reaps the child
    return failed(std::string("sd_event_add_time: ") + std::strerror(-rc));
  }
  sd_event_source_set_description(lookup->timer, "resolver-timeout");
  spdlog::debug("resolving {} (pid {})", host, pid);
  lookup_ = lookup.release();
}

int Resolver::on_child(sd_event_source*, const siginfo_t*, void* userdata) {
  auto* self = static_cast<Resolver*>(userdata);
  return guarded("child", [&] {
    Lookup* l = self->lookup_;
    if (!l) return;
    // sd-event reaps the child right after this callback; without ownership freeing the source
    // does not try to kill or wait for the pid again.
    sd_event_source_set_child_process_own(l->child, 0);
    l->child = sd_event_source_disable_unref(l->child);
    // The child wrote its whole answer before it exited, so the pipe holds all of it.
    unsigned char buf[kAnswerMax];
    std::size_t len = 0;
    while (len < sizeof(buf)) {
      const ssize_t n = ::read(l->fd, buf + len, sizeof(buf) - len);
      if (n > 0) {
        len += static_cast<std::size_t>(n);
      } else if (n < 0 && errno == EINTR) {
        continue;
      } else {
        break;
      }
    }
    self->finish(parse_answer(buf, len));
  });
}

int Resolver::on_timeout(sd_event_source*, std::uint64_t, void* userdata) {
  auto* self = static_cast<Resolver*>(userdata);
  return guarded("timeout", [&] {
    if (!self->lookup_) return;
    Resolution r;
    r.error = "no answer within " + format_duration(self->lookup_->timeout);
    self->finish(std::move(r));  // frees the lookup: the child is killed and reaped
  });
}

int Resolver::on_defer(sd_event_source*, void* userdata) {
  auto* self = static_cast<Resolver*>(userdata);
  return guarded("answer", [&] {
    if (!self->lookup_) return;
    self->finish(std::move(self->lookup_->early));
  });
}

void Resolver::finish(Resolution result) {
  Callback cb = std::move(lookup_->callback);
  cancel();
  // Last thing: the callback may resolve again or destroy this Resolver.
  if (cb) cb(std::move(result));
}

}  // namespace tb::net
