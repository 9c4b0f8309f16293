// A real sd-event loop for source tests: SIGCHLD blocked as the daemon does (sd_event_add_child
// requires it), helpers that run the loop until something happened or a guard expires, and a
// scratch directory for files and pid files.
#pragma once

#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <string>

#include <gtest/gtest.h>
#include <spdlog/sinks/ringbuffer_sink.h>
#include <spdlog/spdlog.h>
#include <systemd/sd-event.h>

#include "sources/exec_source.hpp"
#include "sources/file_source.hpp"
#include "sources/source.hpp"

namespace tb::sources::testing {

using namespace std::chrono_literals;

class LoopTest : public ::testing::Test {
 protected:
  void SetUp() override {
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    ASSERT_EQ(sigprocmask(SIG_BLOCK, &mask, nullptr), 0);
    ASSERT_GE(sd_event_new(&loop), 0);
    std::string tmpl = (std::filesystem::temp_directory_path() / "tb-sources-XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir = tmpl;
  }
  void TearDown() override {
    loop = sd_event_unref(loop);
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }

  // Runs the loop until pred() holds or `guard` passes; returns pred().
  bool run_until(const std::function<bool()>& pred, Millis guard = 10s) {
    const auto deadline = std::chrono::steady_clock::now() + guard;
    while (!pred()) {
      if (std::chrono::steady_clock::now() >= deadline) return false;
      if (sd_event_run(loop, 10000) < 0) return false;
    }
    return true;
  }
  void run_for(Millis d) {
    run_until([] { return false; }, d);
  }

  // One collection, run to its end.
  Collected collect_once(Source& s, Millis guard = 10s) {
    std::optional<Collected> got;
    s.collect([&](Collected c) { got = std::move(c); });
    EXPECT_FALSE(got.has_value()) << "done ran synchronously inside collect()";
    EXPECT_TRUE(run_until([&] { return got.has_value(); }, guard)) << "collection never ended";
    return got ? std::move(*got) : Collected{std::nullopt, "<never finished>"};
  }

  std::string write_file(const std::string& name, const std::string& content) {
    const auto path = dir / name;
    std::ofstream(path, std::ios::binary | std::ios::trunc) << content;
    return path.string();
  }

  std::string read_file(const std::string& name) {
    std::ifstream in(dir / name);
    std::string s;
    std::getline(in, s);
    return s;
  }

  sd_event* loop = nullptr;
  std::filesystem::path dir;
};

// Captures what is logged while it lives (the last `lines` lines), in place of the default logger.
class LogCapture {
 public:
  explicit LogCapture(std::size_t lines = 2000)
      : sink_(std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(lines)) {
    previous_ = spdlog::default_logger();
    auto logger = std::make_shared<spdlog::logger>("capture", sink_);
    logger->set_pattern("%v");
    logger->set_level(spdlog::level::info);
    spdlog::set_default_logger(logger);
  }
  ~LogCapture() { spdlog::set_default_logger(previous_); }
  std::size_t count(const std::string& needle) const {
    std::size_t n = 0;
    for (const auto& line : sink_->last_formatted())
      if (line.find(needle) != std::string::npos) ++n;
    return n;
  }
  std::string all() const {
    std::string out;
    for (const auto& line : sink_->last_formatted()) out += line;
    return out;
  }

 private:
  std::shared_ptr<spdlog::sinks::ringbuffer_sink_mt> sink_;
  std::shared_ptr<spdlog::logger> previous_;
};

// Our child is reaped: waitid says there is no such child (a zombie would still be reported).
inline bool reaped(pid_t pid) {
  siginfo_t si{};
  return waitid(P_PID, static_cast<id_t>(pid), &si, WEXITED | WNOHANG | WNOWAIT) < 0 &&
         errno == ECHILD;
}

// Any process (not necessarily our child) is gone or a zombie waiting for its reaper.
inline bool dead(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  if (!stat) return true;
  std::string line;
  std::getline(stat, line);
  const auto close = line.rfind(')');
  return close != std::string::npos && close + 2 < line.size() && line[close + 2] == 'Z';
}

// A config of type `type` whose settings are S's defaults; edit<S>() changes them.
template <class S>
config::SourceConfig source_config(const std::string& name, const std::string& type) {
  config::SourceConfig c;
  c.name = name;
  c.type = type;
  c.settings = std::make_shared<S>();
  return c;
}

// The settings of `c` to change: a copy, so other configs sharing them stay as they are.
template <class S>
S& edit(config::SourceConfig& c) {
  auto copy = std::make_shared<S>(*config::settings_of<S>(c));
  S& settings = *copy;
  c.settings = std::move(copy);
  return settings;
}

inline config::SourceConfig file_config(const std::string& path, double scale = 1.0,
                                        double offset = 0.0) {
  auto c = source_config<FileSettings>("room", "file");
  auto& s = edit<FileSettings>(c);
  s.path = path;
  s.key = "temperature";
  s.scale = scale;
  s.offset = offset;
  return c;
}

inline config::SourceConfig exec_config(std::vector<std::string> command, Millis timeout = 5s) {
  auto c = source_config<ProgramSettings>("sensors", "exec");
  auto& s = edit<ProgramSettings>(c);
  s.command = std::move(command);
  s.timeout = timeout;
  return c;
}

inline config::SourceConfig sh(const std::string& script, Millis timeout = 5s) {
  return exec_config({"/bin/sh", "-c", script}, timeout);
}

template <typename T>
const T* value_of(const telemetry::Record& r, const std::string& key) {
  for (const auto& reading : r.readings)
    if (reading.key == key) return std::get_if<T>(&reading.value);
  return nullptr;
}

}  // namespace tb::sources::testing
