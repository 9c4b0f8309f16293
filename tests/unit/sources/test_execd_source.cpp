// type: execd with real child processes (/bin/sh scripts) on a real loop: lines → readings, own
// ts, garbage and long lines counted, restart backoff, flood back-pressure, stderr logging,
// SIGTERM → SIGKILL on stop, collect() for --test.
#include <signal.h>

#include <gtest/gtest.h>

#include "harness.hpp"
#include "sources/execd_source.hpp"
#include "util/clock.hpp"

namespace tb::sources::testing {
namespace {

config::SourceConfig execd(const std::string& script, Millis timeout = 5s) {
  auto c = source_config<ProgramSettings>("modem", "execd");
  c.interval = Millis(0);
  edit<ProgramSettings>(c).command = {"/bin/sh", "-c", script};
  edit<ProgramSettings>(c).timeout = timeout;
  return c;
}

class ExecdTest : public LoopTest {
 protected:
  std::unique_ptr<ExecdSource> make(const config::SourceConfig& c) {
    std::string err;
    auto s = make_source(loop, c, &err);
    EXPECT_TRUE(s) << err;
    return std::unique_ptr<ExecdSource>(static_cast<ExecdSource*>(s.release()));
  }
  void start(ExecdSource& s) {
    std::string err;
    ASSERT_TRUE(s.start([this](telemetry::Record r) { records.push_back(std::move(r)); }, &err))
        << err;
  }
  bool alive(pid_t pid) { return pid > 0 && !dead(pid); }
  std::vector<telemetry::Record> records;
};

TEST_F(ExecdTest, LinesBecomeReadingsStampedOnArrivalOrWithTheirOwnTs) {
  const auto before = wall_ms();
  auto s = make(execd(R"(echo '{"a":1}'; sleep 0.3; echo '{"ts":1700000000123,"b":"x"}'; )"
                      R"(echo; echo '{"c":null}'; exec sleep 60)"));
  start(*s);
  ASSERT_TRUE(run_until([&] { return records.size() >= 2; }));
  const auto after = wall_ms();
  ASSERT_NE(value_of<std::int64_t>(records[0], "a"), nullptr);
  EXPECT_GE(records[0].ts_ms, before);
  EXPECT_LE(records[0].ts_ms, after);
  EXPECT_EQ(records[0].source, "modem");
  EXPECT_EQ(records[1].ts_ms, 1700000000123);
  ASSERT_EQ(records[1].readings.size(), 1u) << "ts is the record's time, not a reading";
  EXPECT_EQ(*value_of<std::string>(records[1], "b"), "x");
  run_for(200ms);
  EXPECT_EQ(records.size(), 2u) << "empty lines and all-null objects produce nothing";
  EXPECT_EQ(s->status().readings, 2u);
  EXPECT_EQ(s->status().errors, 0u);
  EXPECT_EQ(s->status().type, "execd");
  EXPECT_EQ(s->status().interval.count(), 0);
  EXPECT_EQ(s->spawns(), 1u);
}

TEST_F(ExecdTest, GarbageAndOverlongLinesAreCountedAndNeverFatal) {
  LogCapture log;
  auto s = make(execd(R"(echo 'not json'; echo '{"ts":1700000000}'; )"
                      R"(head -c 70000 /dev/zero | tr '\0' a; echo; echo '{"ok":1}'; )"
                      R"(exec sleep 60)"));
  start(*s);
  ASSERT_TRUE(run_until([&] { return !records.empty(); }));
  ASSERT_EQ(records.size(), 1u);
  EXPECT_NE(value_of<std::int64_t>(records[0], "ok"), nullptr);
  EXPECT_EQ(s->status().errors, 3u) << "garbage, a ts in seconds, a line over 64 KiB";
  EXPECT_TRUE(s->status().last_error.empty()) << "a good line clears it";
  EXPECT_EQ(s->spawns(), 1u) << "the program was not restarted";
  EXPECT_NE(s->child_pid(), 0);
  EXPECT_EQ(log.count("source 'modem': rejected a line: output is not a JSON object"), 1u);
  EXPECT_EQ(log.count("more rejected line(s) not logged"), 0u)
      << "the first rejection is logged; the next two within a minute are not";
}

TEST_F(ExecdTest, AGarbageFloodIsLoggedOnceAndShownInLastError) {
  LogCapture log;
  auto s = make(execd(R"(i=0; while [ $i -lt 50 ]; do echo junk$i; i=$((i+1)); done; )"
                      R"(exec sleep 60)"));
  start(*s);
  ASSERT_TRUE(run_until([&] { return s->status().errors >= 50; }));
  EXPECT_EQ(log.count("rejected a line"), 1u);
  EXPECT_NE(s->status().last_error.find("junk49"), std::string::npos) << s->status().last_error;
}

TEST_F(ExecdTest, ADeadProgramIsRestartedWithGrowingDelay) {
  LogCapture log;
  auto s = make(execd(R"(echo '{"n":1}'; exit 3)"));
  s->set_restart_backoff(50ms, 400ms);
  start(*s);
  std::vector<Millis> ceilings;
  unsigned seen = 0;
  ASSERT_TRUE(run_until([&] {
    if (s->spawns() != seen) {
      seen = s->spawns();
      ceilings.push_back(s->restart_ceiling());
    }
    return seen >= 6;
  }));
  // Each restart doubles the ceiling the next delay is drawn under, up to the cap.
  EXPECT_EQ(ceilings[1], 100ms);
  EXPECT_EQ(ceilings[2], 200ms);
  EXPECT_EQ(ceilings[3], 400ms);
  EXPECT_EQ(ceilings[4], 400ms);
  EXPECT_GE(records.size(), 5u) << "each run's line still counts";
  EXPECT_NE(s->status().last_error.find("exited with status 3"), std::string::npos);
  EXPECT_GE(log.count("source 'modem': /bin/sh"), 5u);
  EXPECT_GE(log.count("exited with status 3"), 5u);
}

TEST_F(ExecdTest, AFloodDoesNotStallTheLoopOrOtherSources) {
  auto flood = make(execd(R"(while :; do echo '{"x":1}'; echo garbage; done)"));
  start(*flood);
  config::SourceConfig fc = file_config(write_file("v", "7"));
  fc.interval = 200ms;
  std::string err;
  auto file = make_source(loop, fc, &err);
  ASSERT_TRUE(file) << err;
  std::vector<telemetry::Record> file_records;
  ASSERT_TRUE(
      file->start([&](telemetry::Record r) { file_records.push_back(std::move(r)); }, &err));
  const auto t0 = std::chrono::steady_clock::now();
  run_for(3s);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // 200 ms ticks for ~3 s: 15 or 16; a stalled loop would have far fewer.
  EXPECT_GE(file_records.size(), 12u);
  // Lines are read at most kMaxLinesPerSecond a second (garbage included): the program is
  // throttled by the pipe, not the agent by the program.
  const double lines = static_cast<double>(flood->status().readings + flood->status().errors);
  EXPECT_LE(lines, ExecdSource::kMaxLinesPerSecond * (secs + 1.5));
  EXPECT_GE(lines, ExecdSource::kMaxLinesPerSecond * 2.0);
  EXPECT_EQ(flood->spawns(), 1u);
}

TEST_F(ExecdTest, StderrLinesAreLoggedWithTheSourceNameRateLimited) {
  LogCapture log;
  auto s = make(execd(R"(echo 'modem not ready' >&2; i=0; while [ $i -lt 40 ]; do )"
                      R"(echo noise >&2; i=$((i+1)); done; exec sleep 60)"));
  start(*s);
  ASSERT_TRUE(run_until([&] { return log.count("stderr: noise") >= 19; }));
  run_for(300ms);
  EXPECT_EQ(log.count("source 'modem': stderr: modem not ready"), 1u);
  EXPECT_EQ(log.count("stderr: noise"), ExecdSource::kStderrLinesPerWindow - 1)
      << "at most kStderrLinesPerWindow lines per window";
}

TEST_F(ExecdTest, StopSendsSigtermAndTheProgramExits) {
  auto s = make(execd(R"(echo '{"a":1}'; exec sleep 60)"));
  s->set_stop_grace(30s);  // a SIGKILL would come far too late for this test
  start(*s);
  ASSERT_TRUE(run_until([&] { return !records.empty(); }));
  const pid_t pid = s->child_pid();
  ASSERT_GT(pid, 0);
  s->stop();
  EXPECT_EQ(stopping_programs(), 1u);
  EXPECT_TRUE(run_until([&] { return reaped(pid); }, 5s)) << "SIGTERM did not end it";
  EXPECT_EQ(stopping_programs(), 0u);
  EXPECT_FALSE(s->started());
}

TEST_F(ExecdTest, AProgramIgnoringSigtermIsKilledAfterTheGraceEvenWhenItsSourceIsGone) {
  LogCapture log;
  auto s = make(execd(R"(trap '' TERM; echo '{"a":1}'; while :; do sleep 1; done)"));
  s->set_stop_grace(500ms);
  start(*s);
  ASSERT_TRUE(run_until([&] { return !records.empty(); }));
  const pid_t pid = s->child_pid();
  bool all_stopped = false;
  set_on_all_programs_stopped([&] { all_stopped = true; });
  s->stop();
  s.reset();  // as a reload does with a changed or removed source
  run_for(300ms);
  EXPECT_TRUE(alive(pid)) << "it ignores SIGTERM, and the grace has not passed";
  EXPECT_EQ(stopping_programs(), 1u);
  EXPECT_TRUE(run_until([&] { return reaped(pid); }, 5s));
  EXPECT_TRUE(all_stopped);
  EXPECT_EQ(stopping_programs(), 0u);
  EXPECT_EQ(log.count("did not exit after SIGTERM; sending SIGKILL"), 1u);
  set_on_all_programs_stopped(nullptr);
}

TEST_F(ExecdTest, CollectWaitsForTheFirstLineWithinTheTimeout) {
  auto s = make(execd(R"(sleep 0.2; echo '{"signal":-71}'; exec sleep 60)"));
  const auto c = collect_once(*s);
  ASSERT_TRUE(c.record) << c.error;
  EXPECT_EQ(*value_of<std::int64_t>(*c.record, "signal"), -71);
  const pid_t pid = s->child_pid();
  s.reset();
  EXPECT_TRUE(run_until([&] { return reaped(pid); }, 5s));

  auto silent = make(execd("exec sleep 60", 300ms));
  const auto none = collect_once(*silent);
  EXPECT_FALSE(none.record);
  EXPECT_NE(none.error.find("printed no reading within"), std::string::npos) << none.error;

  auto dies = make(execd("exit 4"));
  const auto died = collect_once(*dies);
  EXPECT_FALSE(died.record);
  EXPECT_NE(died.error.find("exited with status 4"), std::string::npos) << died.error;
}

TEST_F(ExecdTest, EnvAndWorkingDirectory) {
  auto c = execd(R"sh(printf '{"modem":"%s","cwd":"%s"}\n' "$MODEM" "$(pwd)"; exec sleep 60)sh");
  edit<ProgramSettings>(c).env = {{"MODEM", "/dev/ttyUSB2"}};
  edit<ProgramSettings>(c).working_directory = dir.string();
  auto s = make(c);
  start(*s);
  ASSERT_TRUE(run_until([&] { return !records.empty(); }));
  EXPECT_EQ(*value_of<std::string>(records[0], "modem"), "/dev/ttyUSB2");
  EXPECT_EQ(*value_of<std::string>(records[0], "cwd"), dir.string());
}

TEST_F(ExecdTest, AMissingProgramIsAnErrorAndRetried) {
  auto c = execd("");
  edit<ProgramSettings>(c).command = {"/nonexistent/modem-watch"};
  auto s = make(c);
  s->set_restart_backoff(50ms, 100ms);
  start(*s);
  EXPECT_TRUE(s->started());
  ASSERT_TRUE(run_until([&] { return s->status().errors >= 3; }));
  EXPECT_NE(s->status().last_error.find("No such file"), std::string::npos)
      << s->status().last_error;
}

}  // namespace
}  // namespace tb::sources::testing
