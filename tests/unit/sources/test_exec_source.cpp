#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include "harness.hpp"
#include "sources/exec_source.hpp"
#include "util/clock.hpp"

namespace tb::sources::testing {
namespace {

class ExecSourceTest : public LoopTest {
 protected:
  std::unique_ptr<ExecSource> make(const config::SourceConfig& c) {
    std::string err;
    auto s = make_source(loop, c, &err);
    EXPECT_TRUE(s) << err;
    return std::unique_ptr<ExecSource>(static_cast<ExecSource*>(s.release()));
  }
  Collected run(const config::SourceConfig& c) {
    auto s = make(c);
    return collect_once(*s);
  }
};

TEST_F(ExecSourceTest, GoodJsonKeepsTypesAndOrderAndSkipsNull) {
  auto s = make(sh(R"(printf '{"i": 42, "neg": -7, "d": 21.5, "whole": 2.0, "b": true,
                     "f": false, "s": "ok", "n": null, "big": 18446744073709551615}\n')"));
  const auto before = wall_ms();
  const auto c = collect_once(*s);
  ASSERT_TRUE(c.record) << c.error;
  EXPECT_EQ(c.record->source, "sensors");
  EXPECT_GE(c.record->ts_ms, before);
  EXPECT_LE(c.record->ts_ms, wall_ms());
  std::vector<std::string> keys;
  for (const auto& r : c.record->readings) keys.push_back(r.key);
  EXPECT_EQ(keys, (std::vector<std::string>{"i", "neg", "d", "whole", "b", "f", "s", "big"}));
  EXPECT_EQ(*value_of<std::int64_t>(*c.record, "i"), 42);
  EXPECT_EQ(*value_of<std::int64_t>(*c.record, "neg"), -7);
  EXPECT_DOUBLE_EQ(*value_of<double>(*c.record, "d"), 21.5);
  EXPECT_DOUBLE_EQ(*value_of<double>(*c.record, "whole"), 2.0) << "2.0 was written as a double";
  EXPECT_EQ(*value_of<bool>(*c.record, "b"), true);
  EXPECT_EQ(*value_of<bool>(*c.record, "f"), false);
  EXPECT_EQ(*value_of<std::string>(*c.record, "s"), "ok");
  EXPECT_DOUBLE_EQ(*value_of<double>(*c.record, "big"), 18446744073709551615.0);
  EXPECT_EQ(s->status().readings, 8u);
  EXPECT_EQ(s->status().type, "exec");
}

TEST_F(ExecSourceTest, ChildReapedBeforeDoneRuns) {
  auto s = make(sh(R"(echo '{"a":1}')"));
  std::optional<Collected> got;
  s->collect([&](Collected c) { got = std::move(c); });
  const pid_t pid = s->child_pid();
  ASSERT_GT(pid, 0);
  ASSERT_TRUE(run_until([&] { return got.has_value(); }));
  EXPECT_TRUE(got->record) << got->error;
  EXPECT_TRUE(reaped(pid));
  EXPECT_EQ(s->child_pid(), 0);
}

TEST_F(ExecSourceTest, GarbageOutput) {
  const auto c = run(sh("echo hello world"));
  ASSERT_FALSE(c.record);
  EXPECT_EQ(c.error, "output is not a JSON object: hello world");
}

TEST_F(ExecSourceTest, GarbageOutputIsCut) {
  const auto c = run(sh("head -c 2000 /dev/zero | tr '\\0' 'x'"));
  ASSERT_FALSE(c.record);
  EXPECT_LT(c.error.size(), 90u) << c.error;
}

TEST_F(ExecSourceTest, NonObjectJson) {
  const auto c = run(sh("echo '[1, 2]'"));
  ASSERT_FALSE(c.record);
  EXPECT_EQ(c.error, "output is not a JSON object: [1, 2]");
}

TEST_F(ExecSourceTest, TwoObjectsAreNotOne) {
  const auto c = run(sh(R"(echo '{"a":1}'; echo '{"b":2}')"));
  ASSERT_FALSE(c.record);
  EXPECT_EQ(c.error.rfind("output is not a JSON object: ", 0), 0u) << c.error;
}

TEST_F(ExecSourceTest, NestedValueRejectsTheWholeOutput) {
  auto c = run(sh(R"(echo '{"ok": 1, "a": {"b": 1}}')"));
  ASSERT_FALSE(c.record);
  EXPECT_EQ(c.error,
            "value of 'a' is an object; values must be numbers, booleans, strings or null");
  c = run(sh(R"(echo '{"ok": 1, "list": [1]}')"));
  ASSERT_FALSE(c.record);
  EXPECT_EQ(c.error,
            "value of 'list' is an array; values must be numbers, booleans, strings or null");
}

TEST_F(ExecSourceTest, EmptyKeyRejectsTheWholeOutput) {
  const auto c = run(sh(R"(echo '{"": 1}')"));
  ASSERT_FALSE(c.record);
  EXPECT_EQ(c.error, "output has an empty key");
}

TEST_F(ExecSourceTest, OnlyNullsIsAnEmptySuccess) {
  const auto c = run(sh(R"(echo '{"a": null}')"));
  ASSERT_TRUE(c.record) << c.error;
  EXPECT_TRUE(c.record->readings.empty());
}

TEST_F(ExecSourceTest, NoOutput) {
  const auto c = run(sh("echo 'sensor asleep' >&2"));
  ASSERT_FALSE(c.record);
  EXPECT_EQ(c.error, "produced no output: sensor asleep");
}

TEST_F(ExecSourceTest, ExitStatusWithFirstLineOfStderr) {
  const auto c = run(sh("echo; echo '  sensor not found  ' >&2; echo 'second line' >&2; exit 3"));
  ASSERT_FALSE(c.record);
  EXPECT_EQ(c.error, "exited with status 3: sensor not found");
}

TEST_F(ExecSourceTest, ExitStatusWithoutStderr) {
  const auto c = run(sh(R"(echo '{"a":1}'; exit 3)"));
  ASSERT_FALSE(c.record);
  EXPECT_EQ(c.error, "exited with status 3");
}

TEST_F(ExecSourceTest, Crash) {
  const auto c = run(sh("kill -SEGV $$"));
  ASSERT_FALSE(c.record);
  EXPECT_EQ(c.error, "killed by signal SIGSEGV");
}

TEST_F(ExecSourceTest, HangIsKilledAtTheTimeout) {
  auto s = make(exec_config({"sleep", "100"}, 300ms));
  std::optional<Collected> got;
  const auto t0 = std::chrono::steady_clock::now();
  s->collect([&](Collected c) { got = std::move(c); });
  const pid_t pid = s->child_pid();
  ASSERT_GT(pid, 0);
  ASSERT_TRUE(run_until([&] { return got.has_value(); }));
  const auto took = std::chrono::steady_clock::now() - t0;
  ASSERT_FALSE(got->record);
  EXPECT_EQ(got->error, "timed out after 300ms");
  EXPECT_GE(took, 300ms);
  EXPECT_LT(took, 1200ms) << "sleep dies on SIGTERM; no need to wait for the SIGKILL grace";
  EXPECT_TRUE(reaped(pid));
  EXPECT_EQ(s->status().errors, 1u);
}

TEST_F(ExecSourceTest, TermIgnoredMeansKill) {
  auto s = make(sh("trap '' TERM; sleep 100", 200ms));
  std::optional<Collected> got;
  const auto t0 = std::chrono::steady_clock::now();
  s->collect([&](Collected c) { got = std::move(c); });
  const pid_t pid = s->child_pid();
  ASSERT_TRUE(run_until([&] { return got.has_value(); }));
  const auto took = std::chrono::steady_clock::now() - t0;
  ASSERT_FALSE(got->record);
  EXPECT_EQ(got->error, "timed out after 200ms");
  EXPECT_GE(took, 200ms + ExecSource::kKillGrace);
  EXPECT_TRUE(reaped(pid));
}

TEST_F(ExecSourceTest, BackgroundHelperHoldingStdoutIsKilledAtTheTimeout) {
  const auto pidfile = (dir / "helper").string();
  auto s = make(sh("sleep 100 & echo $! > " + pidfile + R"(; echo '{"a":1}')", 300ms));
  const auto c = collect_once(*s);
  ASSERT_FALSE(c.record);
  EXPECT_EQ(c.error,
            "timed out after 300ms (the program exited, but a process it started kept stdout "
            "open)");
  const pid_t helper = std::stoi(read_file("helper"));
  EXPECT_TRUE(run_until([&] { return dead(helper); }, 2s));
}

TEST_F(ExecSourceTest, HugeOutputIsKilled) {
  auto s = make(exec_config({"yes"}));
  std::optional<Collected> got;
  s->collect([&](Collected c) { got = std::move(c); });
  const pid_t pid = s->child_pid();
  ASSERT_TRUE(run_until([&] { return got.has_value(); }));
  ASSERT_FALSE(got->record);
  EXPECT_EQ(got->error, "output exceeds 64 KiB");
  EXPECT_TRUE(reaped(pid));
}

TEST_F(ExecSourceTest, OutputOfExactly64KiBIsRead) {
  // 65536 bytes: an object padded with spaces.
  const auto c = run(sh(R"(printf '{"a":1}'; head -c 65529 /dev/zero | tr '\0' ' ')"));
  ASSERT_TRUE(c.record) << c.error;
}

TEST_F(ExecSourceTest, NonexistentProgram) {
  const auto c = run(exec_config({"/nonexistent/tb-agent-test"}));
  ASSERT_FALSE(c.record);
  EXPECT_EQ(c.error, "cannot run /nonexistent/tb-agent-test: No such file or directory");
}

TEST_F(ExecSourceTest, NotExecutable) {
  const auto path = write_file("prog", "#!/bin/sh\necho '{}'\n");
  ASSERT_EQ(chmod(path.c_str(), 0644), 0);
  const auto c = run(exec_config({path}));
  ASSERT_FALSE(c.record);
  EXPECT_EQ(c.error, "cannot run " + path + ": Permission denied");
}

TEST_F(ExecSourceTest, ScriptWithArguments) {
  const auto path = write_file("prog", "#!/bin/sh\nprintf '{\"%s\": %s}' \"$1\" \"$2\"\n");
  ASSERT_EQ(chmod(path.c_str(), 0755), 0);
  const auto c = run(exec_config({path, "with space", "5"}));
  ASSERT_TRUE(c.record) << c.error;
  EXPECT_EQ(*value_of<std::int64_t>(*c.record, "with space"), 5) << "argv, not a shell line";
}

TEST_F(ExecSourceTest, MinimalEnvironment) {
  setenv("TB_SOURCES_TEST_SECRET", "x", 1);
  const auto c =
      run(sh(R"sh(printf '{"src":"%s","lang":"%s","secret":"%s","path":%s,"cwd":"%s"}' )sh"
             R"sh("$TB_AGENT_SOURCE" "$LANG" "${TB_SOURCES_TEST_SECRET-unset}" )sh"
             R"sh("$([ -n "$PATH" ] && echo true || echo false)" "$(pwd)")sh"));
  unsetenv("TB_SOURCES_TEST_SECRET");
  ASSERT_TRUE(c.record) << c.error;
  EXPECT_EQ(*value_of<std::string>(*c.record, "src"), "sensors");
  EXPECT_EQ(*value_of<std::string>(*c.record, "lang"), "C");
  EXPECT_EQ(*value_of<std::string>(*c.record, "secret"), "unset");
  EXPECT_EQ(*value_of<bool>(*c.record, "path"), true);
  EXPECT_EQ(*value_of<std::string>(*c.record, "cwd"), "/");
}

// env adds to the minimal environment (and wins over its defaults); the agent's own variables
// still stay out. working_directory is the program's cwd.
TEST_F(ExecSourceTest, EnvAndWorkingDirectory) {
  setenv("TB_SOURCES_TEST_SECRET", "x", 1);
  auto cfg = sh(R"sh(printf '{"modem":"%s","lang":"%s","secret":"%s","cwd":"%s"}' )sh"
                R"sh("$MODEM" "$LANG" "${TB_SOURCES_TEST_SECRET-unset}" "$(pwd)")sh");
  edit<ProgramSettings>(cfg).env = {{"MODEM", "/dev/ttyUSB2"}, {"LANG", "C.UTF-8"}};
  edit<ProgramSettings>(cfg).working_directory = dir.string();
  const auto c = run(cfg);
  unsetenv("TB_SOURCES_TEST_SECRET");
  ASSERT_TRUE(c.record) << c.error;
  EXPECT_EQ(*value_of<std::string>(*c.record, "modem"), "/dev/ttyUSB2");
  EXPECT_EQ(*value_of<std::string>(*c.record, "lang"), "C.UTF-8");
  EXPECT_EQ(*value_of<std::string>(*c.record, "secret"), "unset");
  EXPECT_EQ(*value_of<std::string>(*c.record, "cwd"), dir.string());
}

TEST_F(ExecSourceTest, AMissingWorkingDirectoryIsRefusedWhenBuilt) {
  for (auto type : {"exec", "execd"}) {
    auto cfg = sh("true");
    cfg.type = type;
    auto& program = edit<ProgramSettings>(cfg);
    program.working_directory = (dir / "missing").string();
    std::string err;
    EXPECT_FALSE(make_source(loop, cfg, &err));
    EXPECT_EQ(err,
              "working_directory " + program.working_directory + ": No such file or directory");
    program.working_directory = write_file("plain", "x");
    EXPECT_FALSE(make_source(loop, cfg, &err));
    EXPECT_EQ(err, "working_directory " + program.working_directory + " is not a directory");
  }
}

TEST_F(ExecSourceTest, CleanSignalsStdinAndFds) {
  // The test process has SIGCHLD blocked (like the agent) and an fd without O_CLOEXEC.
  const int leak = open("/dev/null", O_RDONLY);
  ASSERT_GE(leak, 3);
  const auto c =
      run(sh("cat; printf '{\"blocked\":\"%s\",\"leak\":%s}' "
             "\"$(awk '/^SigBlk/{print $2}' /proc/self/status)\" "
             "\"$([ -e /proc/$$/fd/" +
             std::to_string(leak) + " ] && echo true || echo false)\""));
  close(leak);
  ASSERT_TRUE(c.record) << c.error;
  EXPECT_EQ(*value_of<std::string>(*c.record, "blocked"), "0000000000000000");
  EXPECT_EQ(*value_of<bool>(*c.record, "leak"), false);
}

TEST_F(ExecSourceTest, AbortKillsWithoutCallingDone) {
  auto s = make(exec_config({"sleep", "100"}, 200ms));
  bool called = false;
  s->collect([&](Collected) { called = true; });
  const pid_t pid = s->child_pid();
  ASSERT_GT(pid, 0);
  s->abort();
  EXPECT_FALSE(s->collecting());
  EXPECT_TRUE(run_until([&] { return reaped(pid); }, 2s));
  EXPECT_FALSE(called);
  const auto c = collect_once(*s);  // usable again
  EXPECT_FALSE(c.record);
}

TEST_F(ExecSourceTest, DestructorKillsAndTheLoopReaps) {
  auto s = make(sh("sleep 100 & sleep 100"));
  s->collect([](Collected) { ADD_FAILURE() << "done after destruction"; });
  const pid_t pid = s->child_pid();
  ASSERT_GT(pid, 0);
  s.reset();
  // The destructor does not wait for the child (it could be stuck in the kernel); the loop reaps
  // it on its next turn.
  EXPECT_FALSE(reaped(pid));
  EXPECT_TRUE(run_until([&] { return reaped(pid); }, 2s));
}

TEST_F(ExecSourceTest, DestructorThenLoopFreedLeavesNoZombie) {
  sd_event* other = nullptr;
  ASSERT_GE(sd_event_new(&other), 0);
  std::string err;
  auto s = make_source(other, exec_config({"sleep", "100"}), &err);
  ASSERT_TRUE(s) << err;
  s->collect([](Collected) {});
  const pid_t pid = static_cast<ExecSource*>(s.get())->child_pid();
  ASSERT_GT(pid, 0);
  s.reset();
  sd_event_unref(other);  // never ran again: freeing it kills and reaps
  EXPECT_TRUE(reaped(pid));
}

TEST_F(ExecSourceTest, WithoutSigchldBlockedItSaysSo) {
  sigset_t mask, old;
  sigemptyset(&mask);
  sigaddset(&mask, SIGCHLD);
  sigprocmask(SIG_UNBLOCK, &mask, &old);
  const auto c = run(sh("echo '{}'"));
  sigprocmask(SIG_SETMASK, &old, nullptr);
  ASSERT_FALSE(c.record);
  EXPECT_NE(c.error.find("SIGCHLD is not blocked"), std::string::npos) << c.error;
}

TEST_F(ExecSourceTest, FactoryRefusesEmptyCommand) {
  std::string err;
  EXPECT_FALSE(make_source(loop, exec_config({}), &err));
  EXPECT_EQ(err, "command is empty");
}

TEST(ParseOutput, Table) {
  telemetry::Record r;
  std::string err;
  EXPECT_TRUE(parse_output(" {\"a\": -1.5e2}\n\n", &r, &err)) << err;
  EXPECT_DOUBLE_EQ(std::get<double>(r.readings.at(0).value), -150.0);
  EXPECT_FALSE(parse_output("", &r, &err));
  EXPECT_EQ(err, "produced no output");
  EXPECT_FALSE(parse_output("{\"a\": 1e999}", &r, &err));
  EXPECT_FALSE(parse_output("{\"a\": 1,}", &r, &err));
  EXPECT_EQ(err, "output is not a JSON object: {\"a\": 1,}");
  EXPECT_FALSE(parse_output("\"just a string\"", &r, &err));
}

}  // namespace
}  // namespace tb::sources::testing
