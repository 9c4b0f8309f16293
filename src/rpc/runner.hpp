// Runs one operator-defined RPC command (docs/attributes.md): argv, no shell, a small fixed
// environment, stdin /dev/null, in its own process group, as the agent's own user (the service
// user under systemd), through the exec source's spawn_program(). Output is bounded (stdout kept
// up to kMaxOutput, the rest read and dropped; stderr up to kMaxStderr); at the timeout the whole
// group gets SIGKILL. Nothing blocks the loop: the child, its pipes and the timer are sd-event
// sources.
#pragma once

#include <sys/types.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <systemd/sd-event.h>

#include "util/clock.hpp"

namespace tb::rpc {

struct CommandResult {
  bool started = false;
  int exit_code = -1;  // -1 when killed by a signal or not started
  int signal = 0;
  bool timed_out = false;
  bool truncated = false;  // stdout was longer than kMaxOutput
  std::string output;      // stdout, at most kMaxOutput bytes
  std::string errors;      // stderr, at most kMaxStderr bytes
  std::string error;       // why it did not start
};

class CommandRunner {
 public:
  static constexpr std::size_t kMaxOutput = 4096;  // fits a reply in a few CoAP blocks
  static constexpr std::size_t kMaxStderr = 512;

  // done runs exactly once, from the loop (never inside the constructor), unless the runner is
  // destroyed first (then the program is killed).
  CommandRunner(sd_event* loop, const std::vector<std::string>& command, Millis timeout,
                std::function<void(const CommandResult&)> done);
  ~CommandRunner();
  CommandRunner(const CommandRunner&) = delete;
  CommandRunner& operator=(const CommandRunner&) = delete;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tb::rpc
