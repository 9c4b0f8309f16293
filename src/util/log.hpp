// Logging setup: spdlog to the journal (with priorities and structured fields) when started by
// systemd (JOURNAL_STREAM points at our stderr), to stderr otherwise. Everything else just calls
// spdlog::info(...) etc.
#pragma once

#include <string>
#include <string_view>

namespace tb::log {

enum class Target { Auto, Journal, Stderr };

// level: trace, debug, info, warning, error, critical, off. Returns false on an unknown level.
bool setup(std::string_view level, Target target = Target::Auto);
bool set_level(std::string_view level);

// Fields attached to every journal entry logged on this thread while the guard lives, e.g.
// TB_SOURCE=room or TB_STATE=retrying (journalctl TB_SOURCE=room). Ignored on stderr.
class FieldGuard {
 public:
  FieldGuard(std::string name, std::string value);
  ~FieldGuard();
  FieldGuard(const FieldGuard&) = delete;
  FieldGuard& operator=(const FieldGuard&) = delete;
};

}  // namespace tb::log
