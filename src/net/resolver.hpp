// Host name resolution that never blocks the loop (docs/coap.md, "Resolving the server's name").
//
// getaddrinfo() is the only resolver that honours the system's whole NSS setup (/etc/hosts,
// nss-resolve, nss-myhostname, mDNS, ...), and it blocks for as long as the DNS servers do (tens
// of seconds when none answers). libsystemd's sd-resolve would run it on a thread, but Debian 12's
// libsystemd does not export it. So a lookup forks a child that calls getaddrinfo and writes the
// answer to a pipe; the loop learns of its end through sd_event_add_child and reads the answer.
// The child is killed after a timeout and when the lookup is canceled or destroyed.
//
// The process must have SIGCHLD blocked (the daemon's Manager does; sd_event_add_child needs it).
#pragma once

#include <sys/socket.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <systemd/sd-event.h>

#include "util/clock.hpp"

namespace tb::net {

using namespace std::chrono_literals;

struct Address {
  sockaddr_storage storage{};
  socklen_t length = 0;
  const sockaddr* get() const { return reinterpret_cast<const sockaddr*>(&storage); }
};

struct Resolution {
  std::vector<Address> addresses;  // getaddrinfo's order (RFC 6724); empty on failure
  std::string error;               // why not, e.g. "Name or service not known"; empty on success
  bool ok() const { return !addresses.empty(); }
};

// "192.0.2.1:5683", "[2001:db8::1]:5683"
std::string to_string(const Address& address);

class Resolver {
 public:
  using Callback = std::function<void(Resolution)>;
  // At most this many addresses are kept from one answer: the pipe carries one bounded datagram.
  static constexpr std::size_t kMaxAddresses = 16;

  explicit Resolver(sd_event* loop);
  ~Resolver();  // cancels a running lookup: its child is killed and reaped, no callback
  Resolver(const Resolver&) = delete;
  Resolver& operator=(const Resolver&) = delete;

  // Resolves host (a name or a numeric address) for UDP to port. The callback runs exactly once,
  // from the loop, never from inside resolve(); it may call resolve() again or destroy the
  // Resolver. A lookup still running is canceled first (its callback is not called). A lookup
  // that takes longer than `timeout` fails with "timed out after ...".
  void resolve(const std::string& host, std::uint16_t port, Millis timeout, Callback callback);
  // Stops a running lookup without calling its callback.
  void cancel();
  bool busy() const;
  // The running child's pid, 0 when none (for tests).
  int child_pid() const;

 private:
  struct Lookup;
  static int on_child(sd_event_source* s, const siginfo_t* si, void* userdata);
  static int on_timeout(sd_event_source* s, std::uint64_t usec, void* userdata);
  static int on_defer(sd_event_source* s, void* userdata);
  void finish(Resolution result);

  sd_event* loop_;
  Lookup* lookup_ = nullptr;
};

}  // namespace tb::net
