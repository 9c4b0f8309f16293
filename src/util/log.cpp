#include "util/log.hpp"

#include <sys/stat.h>
#include <systemd/sd-journal.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <spdlog/sinks/base_sink.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

namespace tb::log {

namespace {

// Fields like TB_SOURCE=room, set by FieldGuard for the duration of a scope.
thread_local std::vector<std::string> t_fields;

int syslog_priority(spdlog::level::level_enum level) {
  switch (level) {
    case spdlog::level::trace:
    case spdlog::level::debug:
      return 7;  // LOG_DEBUG
    case spdlog::level::info:
      return 6;  // LOG_INFO
    case spdlog::level::warn:
      return 4;  // LOG_WARNING
    case spdlog::level::err:
      return 3;  // LOG_ERR
    case spdlog::level::critical:
      return 2;  // LOG_CRIT
    default:
      return 6;
  }
}

// A journald sink that sends native journal entries (sd_journal_sendv) so priorities and our own
// structured fields survive — journalctl -p warning, journalctl TB_SOURCE=room.
class JournalSink final : public spdlog::sinks::base_sink<spdlog::details::null_mutex> {
 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    std::vector<std::string> fields;
    fields.reserve(4 + t_fields.size());
    fields.push_back("MESSAGE=" + std::string(msg.payload.data(), msg.payload.size()));
    fields.push_back("PRIORITY=" + std::to_string(syslog_priority(msg.level)));
    fields.push_back("SYSLOG_IDENTIFIER=tb-agent");
    if (msg.source.filename) {
      fields.push_back(std::string("CODE_FILE=") + msg.source.filename);
      fields.push_back("CODE_LINE=" + std::to_string(msg.source.line));
    }
    for (const auto& f : t_fields) fields.push_back(f);
    std::vector<iovec> iov;
    iov.reserve(fields.size());
    for (auto& f : fields) iov.push_back({f.data(), f.size()});
    sd_journal_sendv(iov.data(), static_cast<int>(iov.size()));
  }
  void flush_() override {}
};

// systemd sets JOURNAL_STREAM=dev:inode of the stream it connected to our stderr; if our stderr is
// still that stream we talk to the journal natively (systemd.exec(5), "JOURNAL_STREAM").
bool stderr_is_journal() {
  const char* env = std::getenv("JOURNAL_STREAM");
  if (!env) return false;
  unsigned long long dev = 0, ino = 0;
  if (std::sscanf(env, "%llu:%llu", &dev, &ino) != 2) return false;
  struct stat st {};
  if (fstat(2, &st) != 0) return false;
  return st.st_dev == dev && st.st_ino == ino;
}

std::optional<spdlog::level::level_enum> parse_level(std::string_view level) {
  static const std::array<std::pair<std::string_view, spdlog::level::level_enum>, 8> table{{
      {"trace", spdlog::level::trace},
      {"debug", spdlog::level::debug},
      {"info", spdlog::level::info},
      {"warning", spdlog::level::warn},
      {"warn", spdlog::level::warn},
      {"error", spdlog::level::err},
      {"critical", spdlog::level::critical},
      {"off", spdlog::level::off},
  }};
  for (const auto& [name, lvl] : table)
    if (name == level) return lvl;
  return std::nullopt;
}

}  // namespace

bool set_level(std::string_view level) {
  auto lvl = parse_level(level);
  if (!lvl) return false;
  spdlog::set_level(*lvl);
  return true;
}

bool setup(std::string_view level, Target target) {
  const bool journal = target == Target::Journal || (target == Target::Auto && stderr_is_journal());
  std::shared_ptr<spdlog::logger> logger;
  if (journal) {
    logger = std::make_shared<spdlog::logger>("tb-agent", std::make_shared<JournalSink>());
  } else {
    logger = std::make_shared<spdlog::logger>("tb-agent",
                                              std::make_shared<spdlog::sinks::stderr_sink_st>());
    logger->set_pattern("%Y-%m-%d %H:%M:%S.%e %^%l%$ %v");
  }
  spdlog::set_default_logger(logger);
  // Warnings and errors are rare and matter most when the process dies right after them.
  spdlog::flush_on(spdlog::level::warn);
  return set_level(level);
}

FieldGuard::FieldGuard(std::string name, std::string value) {
  t_fields.push_back(std::move(name) + "=" + std::move(value));
}

FieldGuard::~FieldGuard() { t_fields.pop_back(); }

}  // namespace tb::log
