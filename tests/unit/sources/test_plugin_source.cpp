// type: plugin, with real shared objects built from plugins/test_plugin.c (one per behaviour):
// the staged loader and its refusals, typed options, readings validation, async completion and
// timeouts, trust checks on paths, the crash guard (in forked children that really crash or
// hang), and many load/unload rounds (the ASan build turns a leak into a failure).
#include <sys/stat.h>
#include <sys/wait.h>

#include <filesystem>

#include <gtest/gtest.h>

#include "harness.hpp"
#include "sources/plugin_source.hpp"

namespace tb::sources::testing {
namespace {

namespace fs = std::filesystem;

std::string plugin(const std::string& variant) {
  return std::string(TB_TEST_PLUGIN_DIR) + "/" + variant + ".so";
}

config::Value::Map options() {
  return {{"label", {std::string("kitchen")}},
          {"number", {std::int64_t{42}}},
          {"ratio", {0.5}},
          {"flag", {true}}};
}

config::SourceConfig plugin_config(const std::string& path, Millis timeout = 2s) {
  auto c = source_config<PluginSettings>("plug", "plugin");
  c.interval = 10s;
  auto& s = edit<PluginSettings>(c);
  s.path = path;
  s.timeout = timeout;
  s.options.data = options();
  return c;
}

class Plugin : public LoopTest {
 protected:
  void TearDown() override {
    PluginSource::guard_close();
    LoopTest::TearDown();
  }
  SourcePtr make(const config::SourceConfig& c, std::string* error) {
    return make_source(loop, c, error);
  }
  std::string refusal(const std::string& path) {
    std::string err;
    auto s = make(plugin_config(path), &err);
    EXPECT_EQ(s, nullptr) << path;
    return err;
  }
  // A copy of a test plugin in the scratch directory (whose modes the test may change).
  std::string copy(const std::string& variant, const std::string& name) {
    const fs::path to = dir / name;
    fs::copy_file(plugin(variant), to, fs::copy_options::overwrite_existing);
    ::chmod(to.c_str(), 0644);
    return to.string();
  }
};

TEST_F(Plugin, GoodPluginGetsItsTypedOptionsAndItsReadingsArrive) {
  std::string err;
  auto s = make(plugin_config(plugin("good")), &err);
  ASSERT_NE(s, nullptr) << err;
  for (std::int64_t round = 1; round <= 3; ++round) {
    const Collected c = collect_once(*s);
    ASSERT_TRUE(c.record) << c.error;
    EXPECT_EQ(c.record->source, "plug");
    EXPECT_GT(c.record->ts_ms, 0);
    ASSERT_NE(value_of<std::int64_t>(*c.record, "count"), nullptr);
    EXPECT_EQ(*value_of<std::int64_t>(*c.record, "count"), round);
    ASSERT_NE(value_of<std::string>(*c.record, "label"), nullptr);
    EXPECT_EQ(*value_of<std::string>(*c.record, "label"), "kitchen");
    ASSERT_NE(value_of<std::int64_t>(*c.record, "number"), nullptr);
    EXPECT_EQ(*value_of<std::int64_t>(*c.record, "number"), 42);
    ASSERT_NE(value_of<double>(*c.record, "ratio"), nullptr);
    EXPECT_EQ(*value_of<double>(*c.record, "ratio"), 0.5);
    ASSERT_NE(value_of<bool>(*c.record, "flag"), nullptr);
    EXPECT_TRUE(*value_of<bool>(*c.record, "flag"));
  }
  EXPECT_EQ(s->status().readings, 18u);  // count, pid, label, number, ratio, flag
  EXPECT_EQ(s->status().type, "plugin");
}

TEST_F(Plugin, AnOptionOfAnotherTypeIsNotHandedOut) {
  auto c = plugin_config(plugin("good"));
  edit<PluginSettings>(c).options.data =
      config::Value::Map{{"number", {std::string("forty-two")}},
                         {"ratio", {std::int64_t{2}}}};  // an int serves as double
  std::string err;
  auto s = make(c, &err);
  ASSERT_NE(s, nullptr) << err;
  const Collected got = collect_once(*s);
  ASSERT_TRUE(got.record) << got.error;
  EXPECT_EQ(value_of<std::int64_t>(*got.record, "number"), nullptr);
  ASSERT_NE(value_of<double>(*got.record, "ratio"), nullptr);
  EXPECT_EQ(*value_of<double>(*got.record, "ratio"), 2.0);
}

TEST_F(Plugin, WrongAbiVersionIsRefusedNamingBothVersions) {
  const std::string err = refusal(plugin("wrong_abi"));
  EXPECT_NE(err.find("built for plugin ABI 2"), std::string::npos) << err;
  EXPECT_NE(err.find("this agent speaks ABI 1"), std::string::npos) << err;
  const std::string table = refusal(plugin("wrong_table_abi"));
  EXPECT_NE(table.find("built for plugin ABI 2"), std::string::npos) << table;
  const std::string refused = refusal(plugin("refuses"));
  EXPECT_NE(refused.find("refused this agent (plugin ABI 1.0)"), std::string::npos) << refused;
}

TEST_F(Plugin, MissingEntrySymbolIsRefused) {
  const std::string err = refusal(plugin("no_symbol"));
  EXPECT_NE(err.find("not a tb-agent source plugin: no symbol tb_source_plugin_v1"),
            std::string::npos)
      << err;
}

TEST_F(Plugin, NotASharedObjectOrMissingFileIsRefused) {
  EXPECT_NE(refusal(write_file("junk.so", "not an ELF file")).find("cannot load"),
            std::string::npos);
  EXPECT_NE(refusal((dir / "absent.so").string()).find("No such file"), std::string::npos);
}

TEST_F(Plugin, CreateFailureIsReportedWithThePluginsMessage) {
  const std::string err = refusal(plugin("create_fails"));
  EXPECT_NE(err.find("plugin source 'plug' (test): create failed: no sensor at /dev/imaginary"),
            std::string::npos)
      << err;
}

TEST_F(Plugin, FailedCollectIsAnErrorWithThePluginsName) {
  std::string err;
  auto s = make(plugin_config(plugin("fails")), &err);
  ASSERT_NE(s, nullptr) << err;
  const Collected c = collect_once(*s);
  EXPECT_FALSE(c.record);
  EXPECT_NE(c.error.find("plugin source 'plug' (test): collect failed: Input/output error"),
            std::string::npos)
      << c.error;
  EXPECT_EQ(s->status().last_error, c.error);
}

TEST_F(Plugin, GarbageReadingsAreRefusedAndReportedWithThePluginsName) {
  std::string err;
  auto s = make(plugin_config(plugin("garbage")), &err);
  ASSERT_NE(s, nullptr) << err;
  const Collected c = collect_once(*s);
  EXPECT_FALSE(c.record);
  EXPECT_NE(c.error.find("plugin source 'plug' (test) emitted garbage: reading 0: key is not "
                         "valid UTF-8"),
            std::string::npos)
      << c.error;
}

// A plugin built against a later minor version hands over longer tb_readings: the host steps
// through the array by their size and reads the fields it knows.
TEST_F(Plugin, LongerReadingsOfALaterMinorVersionAreRead) {
  std::string err;
  auto s = make(plugin_config(plugin("future_reading")), &err);
  ASSERT_NE(s, nullptr) << err;
  const Collected c = collect_once(*s);
  ASSERT_TRUE(c.record) << c.error;
  ASSERT_EQ(c.record->readings.size(), 2u);
  EXPECT_EQ(*value_of<std::int64_t>(*c.record, "first"), 1);
  EXPECT_EQ(*value_of<std::int64_t>(*c.record, "second"), 2);
}

TEST_F(Plugin, AsyncCollectionCompletesFromItsFd) {
  std::string err;
  auto s = make(plugin_config(plugin("async")), &err);
  ASSERT_NE(s, nullptr) << err;
  for (int round = 1; round <= 2; ++round) {
    const Collected c = collect_once(*s);
    ASSERT_TRUE(c.record) << c.error;
    ASSERT_NE(value_of<std::int64_t>(*c.record, "pushed"), nullptr);
    EXPECT_EQ(*value_of<std::int64_t>(*c.record, "pushed"), round);
  }
}

TEST_F(Plugin, PushedReadingsOutsideACollectionAreEmitted) {
  std::string err;
  auto s = make(plugin_config(plugin("push")), &err);
  ASSERT_NE(s, nullptr) << err;
  std::vector<telemetry::Record> emitted;
  ASSERT_TRUE(s->start([&](telemetry::Record r) { emitted.push_back(std::move(r)); }, &err));
  // The collection itself has no readings; the pushed one comes from on_event.
  ASSERT_TRUE(run_until([&] { return !emitted.empty(); }));
  ASSERT_NE(value_of<std::int64_t>(emitted[0], "pushed"), nullptr);
  EXPECT_EQ(s->status().readings, 1u);
  s->stop();
}

TEST_F(Plugin, CollectThatNeverCompletesTimesOutAndTheNextOneSaysSo) {
  std::string err;
  auto s = make(plugin_config(plugin("never_completes"), 300ms), &err);
  ASSERT_NE(s, nullptr) << err;
  const Collected c = collect_once(*s);
  EXPECT_FALSE(c.record);
  EXPECT_NE(c.error.find("collect did not complete within 300ms"), std::string::npos) << c.error;
  const Collected next = collect_once(*s);
  EXPECT_NE(next.error.find("previous collection never completed"), std::string::npos)
      << next.error;
}

TEST_F(Plugin, WorldOrGroupWritableFileOrDirectoryIsRefused) {
  const std::string ok = copy("good", "good.so");
  EXPECT_EQ(PluginSource::untrusted(ok), "");
  ::chmod(ok.c_str(), 0666);
  EXPECT_NE(refusal(ok).find("is writable by everyone (mode 0666)"), std::string::npos);
  ::chmod(ok.c_str(), 0664);
  EXPECT_NE(refusal(ok).find("is writable by its group"), std::string::npos);
  ::chmod(ok.c_str(), 0644);

  const fs::path open_dir = dir / "open";
  fs::create_directory(open_dir);
  ::chmod(open_dir.c_str(), 0777);
  fs::copy_file(ok, open_dir / "good.so");
  const std::string err = refusal((open_dir / "good.so").string());
  EXPECT_NE(err.find("directory " + open_dir.string() + " is writable by everyone"),
            std::string::npos)
      << err;
  // A sticky directory (like /tmp) keeps others from replacing our entries: accepted.
  ::chmod(open_dir.c_str(), 01777);
  EXPECT_EQ(PluginSource::untrusted((open_dir / "good.so").string()), "");
  // A symlink is judged by what it points to.
  fs::create_symlink(ok, dir / "link.so");
  ::chmod(ok.c_str(), 0666);
  EXPECT_NE(refusal((dir / "link.so").string()).find("writable by everyone"), std::string::npos);
}

TEST_F(Plugin, FileOwnedByAnotherUserIsRefused) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to chown";
  const std::string p = copy("good", "other.so");
  ASSERT_EQ(::chown(p.c_str(), 65534, 65534), 0);
  EXPECT_NE(refusal(p).find("is owned by uid 65534, not root"), std::string::npos);
}

// Each round dlopens, creates, collects, destroys and dlcloses; under ASan (TB_SANITIZE) a
// leaked instance or handle fails the run.
TEST_F(Plugin, LoadAndUnloadManyTimesWithoutLeaking) {
  for (int i = 0; i < 200; ++i) {
    std::string err;
    auto s = make(plugin_config(plugin(i % 2 ? "good" : "async")), &err);
    ASSERT_NE(s, nullptr) << err;
    if (i % 20 == 0) {
      const Collected c = collect_once(*s);
      ASSERT_TRUE(c.record) << c.error;
    }
    EXPECT_EQ(make(plugin_config(plugin("create_fails")), &err), nullptr);
  }
}

// --- the crash guard: real crashes and hangs, in forked children -----------------------------

// How a child that segfaulted ended: by the signal, or (ASan build) by the sanitizer's report,
// which exits non-zero or, with ASAN_OPTIONS=abort_on_error=1 (CI), aborts.
bool died_of_segv(int status) {
#if defined(__SANITIZE_ADDRESS__)
  if (WIFEXITED(status)) return WEXITSTATUS(status) != 0;
  if (WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT) return true;
#endif
  return WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV;
}

class PluginGuard : public Plugin {
 protected:
  // In a child: the daemon's guard, one collection of `variant`. Returns how the child ended.
  int run_child(const std::string& variant, Millis kill_after = 0ms) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      std::string err;
      if (!PluginSource::guard_open(dir, &err)) ::_exit(3);
      auto s = make(plugin_config(plugin(variant)), &err);
      if (!s) ::_exit(4);
      std::optional<Collected> got;
      s->collect([&](Collected c) { got = std::move(c); });
      run_until([&] { return got.has_value(); }, 5s);
      ::_exit(got && got->record ? 0 : 5);
    }
    if (kill_after.count() > 0) {
      // What systemd does when the watchdog stops hearing from the loop.
      ::usleep(static_cast<useconds_t>(kill_after.count() * 1000));
      ::kill(pid, SIGABRT);
    }
    int status = 0;
    ::waitpid(pid, &status, 0);
    return status;
  }
};

TEST_F(PluginGuard, CrashInCollectCountsStrikesAndDisablesThePluginAfterThree) {
  for (int strike = 1; strike <= PluginSource::kMaxStrikes; ++strike) {
    const int status = run_child("crash");
    ASSERT_TRUE(died_of_segv(status)) << status;
    // The guard record names the source the process died in.
    EXPECT_EQ(read_file("plugin-guard"), "plug");
    std::string err;
    ASSERT_TRUE(PluginSource::guard_open(dir, &err)) << err;  // "the next start"
    EXPECT_EQ(read_file("plugin-guard"), "");
    auto s = make(plugin_config(plugin("crash")), &err);
    ASSERT_NE(s, nullptr) << err;
    if (strike < PluginSource::kMaxStrikes) continue;
    // Disabled: collecting reports why instead of crashing again.
    const Collected c = collect_once(*s);
    EXPECT_FALSE(c.record);
    EXPECT_NE(c.error.find("disabled: the agent died inside this plugin 3 times"),
              std::string::npos)
        << c.error;
    // Another source in the same process is not disturbed.
    auto other = plugin_config(plugin("good"));
    other.name = "other";
    auto fine = make(other, &err);
    ASSERT_NE(fine, nullptr) << err;
    EXPECT_TRUE(collect_once(*fine).record);
    // An operator's reload forgives: the plugin is tried again (and would crash again).
    PluginSource::guard_forgive();
    EXPECT_EQ(read_file("plugin-strikes"), "");
  }
}

TEST_F(PluginGuard, StrikesResetWhenThePluginFileChanges) {
  const std::string p = copy("crash", "crash.so");
  auto c = plugin_config(p);
  for (int i = 0; i < PluginSource::kMaxStrikes; ++i) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      std::string err;
      PluginSource::guard_open(dir, &err);
      auto s = make(c, &err);
      std::optional<Collected> got;
      if (s) s->collect([&](Collected r) { got = std::move(r); });
      run_until([&] { return got.has_value(); }, 5s);
      ::_exit(0);
    }
    int status = 0;
    ::waitpid(pid, &status, 0);
    ASSERT_TRUE(died_of_segv(status)) << status;
    std::string err;
    ASSERT_TRUE(PluginSource::guard_open(dir, &err));
    ASSERT_NE(make(c, &err), nullptr);  // records the fingerprint
  }
  std::string err;
  auto s = make(c, &err);
  EXPECT_NE(collect_once(*s).error.find("disabled"), std::string::npos);
  // A new plugin file (here: the good one in its place) gets a clean slate.
  copy("good", "crash.so");
  auto again = make(c, &err);
  ASSERT_NE(again, nullptr) << err;
  const Collected got = collect_once(*again);
  EXPECT_TRUE(got.record) << got.error;
}

TEST_F(PluginGuard, HangKilledByTheWatchdogCountsAStrike) {
  const int status = run_child("hang", 500ms);
  ASSERT_TRUE(WIFSIGNALED(status));
  EXPECT_EQ(WTERMSIG(status), SIGABRT);
  EXPECT_EQ(read_file("plugin-guard"), "plug");
  std::string err;
  ASSERT_TRUE(PluginSource::guard_open(dir, &err)) << err;
  std::ifstream strikes(dir / "plugin-strikes");
  std::string line;
  std::getline(strikes, line);
  EXPECT_EQ(line.substr(0, 2), "1\t") << line;
  EXPECT_EQ(line.substr(line.size() - 5), "\tplug") << line;
}

TEST_F(PluginGuard, NormalCallsLeaveNoRecord) {
  std::string err;
  ASSERT_TRUE(PluginSource::guard_open(dir, &err)) << err;
  auto s = make(plugin_config(plugin("good")), &err);
  ASSERT_NE(s, nullptr) << err;
  EXPECT_TRUE(collect_once(*s).record);
  EXPECT_EQ(read_file("plugin-guard"), "");
  s.reset();
  EXPECT_EQ(read_file("plugin-guard"), "");
}

TEST_F(PluginGuard, InTheDaemonALoadFailureIsTheSourcesErrorNotTheConfigs) {
  std::string err;
  ASSERT_TRUE(PluginSource::guard_open(dir, &err)) << err;
  auto s = make(plugin_config(plugin("create_fails")), &err);
  ASSERT_NE(s, nullptr) << "a broken plugin must not stop the agent: " << err;
  const Collected c = collect_once(*s);
  EXPECT_NE(c.error.find("create failed: no sensor"), std::string::npos) << c.error;
}

}  // namespace
}  // namespace tb::sources::testing
