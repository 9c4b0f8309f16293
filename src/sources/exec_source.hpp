// type: exec — runs a program (argv, no shell) and reads one JSON object of key → value from its
// stdout. Everything is asynchronous on the loop: posix_spawn, pipes as io sources, the child
// through sd_event_add_child, the timeout as a timer. The process must have SIGCHLD blocked
// (the daemon blocks it before it creates the loop); otherwise collections fail with a message
// saying so.
#pragma once

#include <sys/types.h>

#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "config/schema.hpp"
#include "sources/source.hpp"

namespace tb::sources {

struct SourceType;

// What a program source runs (exec and execd): their keys are one table, kProgramKeys in
// exec_source.cpp, and their one check is check_program() below, beside spawn_program().
struct ProgramSettings : config::SettingsOf<ProgramSettings> {
  std::vector<std::string> command;        // argv; no shell
  Millis timeout{5000};                    // exec: a run; execd: --test's wait for a first line
  std::map<std::string, std::string> env;  // added to the program's small environment
  std::string working_directory = "/";     // must exist (checked when the source is built)
  bool operator==(const ProgramSettings&) const = default;
};
extern const config::Keys<ProgramSettings> kProgramKeys;

class ExecSource final : public Source {
 public:
  static constexpr std::size_t kMaxOutput = 64 * 1024;  // stdout cap; more kills the program
  static constexpr std::size_t kMaxStderr = 1024;       // kept for error messages and debug logs
  // After the timeout the program gets SIGTERM, then this long to exit before SIGKILL.
  static constexpr Millis kKillGrace{1000};

  static const SourceType& declaration();
  static SourcePtr create(sd_event* loop, const config::SourceConfig& config, std::string* error);
  // Kills a running program (its whole process group); see cancel().
  ~ExecSource() override;

  // The running program's pid, 0 when none runs (tests, diagnostics).
  pid_t child_pid() const;

 protected:
  void begin() override;
  // SIGKILL to the program's process group, pipes closed at once. The program is reaped by the
  // loop when it has died (a child stuck in the kernel must not block the loop); if the loop is
  // freed first, sd-event kills and reaps it then.
  void cancel() override;

 private:
  struct Run;
  ExecSource(sd_event* loop, config::SourceConfig config);
  std::string spawn();
  static int on_child(sd_event_source* s, const siginfo_t* si, void* userdata);
  static int on_stdout(sd_event_source* s, int fd, std::uint32_t revents, void* userdata);
  static int on_stderr(sd_event_source* s, int fd, std::uint32_t revents, void* userdata);
  static int on_timer(sd_event_source* s, std::uint64_t usec, void* userdata);
  void child_exited(const siginfo_t& si);
  void read_stdout();
  void read_stderr();
  void timer_fired();
  void fail(std::string error, int signal);
  void signal_group(int sig);
  void close_stdout();
  void close_stderr();
  void finish_if_done();
  void end(Collected c);
  Collected verdict();
  void release_child();

  const ProgramSettings& settings_;
  std::vector<std::string> env_;
  std::unique_ptr<Run> run_;
};

// The environment every program a source runs gets (exec and execd): PATH, LANG=C,
// TB_AGENT_SOURCE=<name>, TZ and CREDENTIALS_DIRECTORY when the agent has them, then the
// source's `env` (which wins over those). Nothing else of the agent's environment.
std::vector<std::string> program_environment(const std::string& source_name,
                                             const ProgramSettings& settings);

// "" when `dir` is an existing directory, else why not (working_directory).
std::string check_working_directory(const std::string& dir);

// What both program sources check when they are built: "" when `settings` can run, else why not
// (an empty command, a timeout that is not positive, a working_directory that does not exist).
std::string check_program(const ProgramSettings& settings);

struct SpawnedProgram {
  pid_t pid = 0;
  int stdout_fd = -1;  // read ends, non-blocking, close-on-exec; the caller owns them
  int stderr_fd = -1;
};
// Starts `command` (argv, no shell) in its own process group with stdin /dev/null, stdout and
// stderr on pipes, a clean signal mask, `working_directory` as cwd and `env` as its whole
// environment. SIGCHLD must
// be blocked. Returns an error sentence, empty on success.
std::string spawn_program(const std::vector<std::string>& command,
                          const std::vector<std::string>& env, const std::string& working_directory,
                          SpawnedProgram* out);

// The program's output → a record: one JSON object of key → number/bool/string; null values are
// skipped; anything else (nested values, empty keys, not an object) rejects the whole output.
// Returns false and sets *error on rejection.
bool parse_output(std::string_view output, telemetry::Record* record, std::string* error);

}  // namespace tb::sources
