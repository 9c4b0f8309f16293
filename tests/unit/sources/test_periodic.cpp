// start()/stop(): ticks, skipping, other sources unaffected, error log rate limiting.
#include <gtest/gtest.h>

#include "harness.hpp"
#include "sources/exec_source.hpp"

namespace tb::sources::testing {
namespace {

class PeriodicTest : public LoopTest {
 protected:
  SourcePtr make(config::SourceConfig c, Millis interval) {
    c.interval = interval;
    std::string err;
    auto s = make_source(loop, c, &err);
    EXPECT_TRUE(s) << err;
    return s;
  }
  std::vector<telemetry::Record> records;
  std::function<void(telemetry::Record)> collect_into(std::vector<telemetry::Record>* out) {
    return [out](telemetry::Record r) { out->push_back(std::move(r)); };
  }
};

TEST_F(PeriodicTest, FirstCollectionIsImmediate) {
  auto s = make(file_config(write_file("v", "7")), 60s);
  std::string err;
  ASSERT_TRUE(s->start(collect_into(&records), &err)) << err;
  EXPECT_TRUE(records.empty()) << "nothing is emitted inside start()";
  EXPECT_TRUE(run_until([&] { return !records.empty(); }, 2s)) << "not at the first tick (60s)";
}

TEST_F(PeriodicTest, CollectsEveryIntervalWithoutDrift) {
  auto s = make(file_config(write_file("v", "7")), 100ms);
  std::string err;
  ASSERT_TRUE(s->start(collect_into(&records), &err)) << err;
  run_until([&] { return records.size() >= 6; });
  s->stop();
  ASSERT_GE(records.size(), 6u);
  for (std::size_t i = 1; i < records.size(); ++i)
    EXPECT_GT(records[i].ts_ms, records[i - 1].ts_ms);
  // Five intervals of 100 ms (accuracy window 10 ms): planned from the start, so no drift.
  const auto span = records[5].ts_ms - records[0].ts_ms;
  EXPECT_GE(span, 490);
  EXPECT_LE(span, 700);
  EXPECT_EQ(s->status().readings, records.size());

  const auto n = records.size();
  run_for(300ms);
  EXPECT_EQ(records.size(), n) << "nothing after stop()";
  EXPECT_FALSE(s->started());

  ASSERT_TRUE(s->start(collect_into(&records), &err)) << err;  // restartable
  EXPECT_FALSE(s->start(collect_into(&records), &err));
  EXPECT_EQ(err, "already started");
  ASSERT_TRUE(run_until([&] { return records.size() > n; }));
}

TEST_F(PeriodicTest, SlowCollectionSkipsTicks) {
  auto s = make(sh(R"(sleep 0.35; echo '{"a":1}')"), 100ms);
  std::string err;
  ASSERT_TRUE(s->start(collect_into(&records), &err)) << err;
  ASSERT_TRUE(run_until([&] { return !records.empty(); }));
  s->stop();
  EXPECT_GE(s->status().skipped, 2u);
  EXPECT_LE(s->status().skipped, 10u);
}

TEST_F(PeriodicTest, AHangingSourceDoesNotHoldUpAnother) {
  auto hang = make(exec_config({"sleep", "100"}, 5s), 10s);
  auto fast = make(file_config(write_file("v", "1")), 100ms);
  std::vector<telemetry::Record> hung;
  std::string err;
  ASSERT_TRUE(hang->start(collect_into(&hung), &err)) << err;
  ASSERT_TRUE(fast->start(collect_into(&records), &err)) << err;
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(run_until([&] { return records.size() >= 6; }, 3s));
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 1500ms);
  EXPECT_TRUE(hung.empty());
  EXPECT_TRUE(hang->collecting());
  const pid_t pid = static_cast<ExecSource*>(hang.get())->child_pid();
  ASSERT_GT(pid, 0);
  hang->stop();  // aborts: kills the child
  EXPECT_TRUE(run_until([&] { return reaped(pid); }, 2s));
  EXPECT_EQ(hang->status().errors, 0u) << "an aborted collection is not a failure";
}

TEST_F(PeriodicTest, StopFromInsideEmit) {
  auto s = make(file_config(write_file("v", "1")), 100ms);
  std::string err;
  int emitted = 0;
  ASSERT_TRUE(s->start(
      [&](telemetry::Record) {
        ++emitted;
        s->stop();
      },
      &err))
      << err;
  run_for(350ms);
  EXPECT_EQ(emitted, 1);
}

TEST_F(PeriodicTest, ErrorsAreLoggedOncePerTextAndRecoveryIsLogged) {
  LogCapture logs;
  const auto path = write_file("v", "abc");
  auto s = make(file_config(path), 100ms);
  std::string err;
  ASSERT_TRUE(s->start(collect_into(&records), &err)) << err;
  ASSERT_TRUE(run_until([&] { return s->status().errors >= 3; }));
  EXPECT_EQ(s->status().last_error, "cannot parse 'abc' as a number");
  write_file("v", "xyz");
  ASSERT_TRUE(run_until([&] { return s->status().errors >= 6; }));
  write_file("v", "5");
  ASSERT_TRUE(run_until([&] { return !records.empty(); }));
  s->stop();
  EXPECT_EQ(logs.count("source 'room': cannot parse 'abc' as a number"), 1u) << logs.all();
  EXPECT_EQ(logs.count("source 'room': cannot parse 'xyz' as a number"), 1u) << logs.all();
  EXPECT_EQ(logs.count("source 'room' recovered after"), 1u) << logs.all();
  EXPECT_TRUE(s->status().last_error.empty());
  EXPECT_GE(s->status().errors, 6u);
}

TEST_F(PeriodicTest, APersistentErrorIsRepeatedAfterTheLogInterval) {
  LogCapture logs;
  auto s = make(file_config((dir / "missing").string()), 100ms);
  s->set_error_log_interval(250ms);
  std::string err;
  ASSERT_TRUE(s->start(collect_into(&records), &err)) << err;
  ASSERT_TRUE(run_until([&] { return s->status().errors >= 8; }));
  s->stop();
  const auto n = logs.count("No such file or directory");
  EXPECT_GE(n, 2u) << logs.all();
  EXPECT_LE(n, 4u) << logs.all();
  EXPECT_GE(logs.count("still failing"), 1u) << logs.all();
}

}  // namespace
}  // namespace tb::sources::testing
