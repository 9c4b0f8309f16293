#include <gtest/gtest.h>

#include <map>

#include "harness.hpp"
#include "sources/system_source.hpp"
#include "util/clock.hpp"

namespace tb::sources::testing {
namespace {

namespace fs = std::filesystem;

// The readings of a record by key.
std::map<std::string, telemetry::Value> by_key(const telemetry::Record& r) {
  std::map<std::string, telemetry::Value> out;
  for (const auto& reading : r.readings) out[reading.key] = reading.value;
  return out;
}

double as_number(const telemetry::Value& v) {
  if (const auto* i = std::get_if<std::int64_t>(&v)) return static_cast<double>(*i);
  return std::get<double>(v);
}

// Linux's format: two header lines, then "name: 8 receive and 8 transmit counters".
constexpr const char* kNetDev =
    "Inter-|   Receive                                                |  Transmit\n"
    " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs "
    "drop fifo colls carrier compressed\n"
    "    lo:    5000      50    0    0    0     0          0         0     5000      50    0    "
    "0    0     0       0          0\n"
    "  eth0: 1000000    2000    3    4    0     0          0         9   500000    1000    5    "
    "6    0     0       0          0\n"
    "br-lan.10:  700    7    0    1    0     0          0         0      800       8    0    "
    "2    0     0       0          0\n"
    "veth1a2b:   10      1    0    0    0     0          0         0       20       2    0    "
    "0    0     0       0          0\n";

// A fake /proc and /sys under `dir`, with values whose readings are known exactly.
class SystemSourceTest : public LoopTest {
 protected:
  void SetUp() override {
    LoopTest::SetUp();
    fs::create_directories(dir / "proc");
    stat("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 100 0 100 800 0 0 0 0 0 0\nintr 1\n");
    write_file("proc/meminfo",
               "MemTotal:        2048000 kB\nMemFree:          100000 kB\n"
               "MemAvailable:     512000 kB\nBuffers:           1000 kB\n"
               "SwapTotal:       1000000 kB\nSwapFree:         750000 kB\n");
    fs::create_directories(dir / "proc/net");
    write_file("proc/net/dev", kNetDev);
    write_file("proc/loadavg", "0.50 0.25 0.10 1/123 4567\n");
    write_file("proc/uptime", "12345.67 2000.00\n");
    zone(0, "acpitz", "40000");
    zone(1, "x86_pkg_temp", "55500");
  }
  void stat(const std::string& text) { write_file("proc/stat", text); }
  void zone(int n, const std::string& type, const std::string& temp) {
    const auto z = "sys/class/thermal/thermal_zone" + std::to_string(n);
    fs::create_directories(dir / z);
    write_file(z + "/type", type + "\n");
    write_file(z + "/temp", temp + "\n");
  }
  config::SourceConfig config(std::vector<std::string> metrics = {}) {
    auto c = source_config<SystemSettings>("host", "system");
    c.interval = 10s;
    edit<SystemSettings>(c).metrics = std::move(metrics);
    edit<SystemSettings>(c).disk_path = dir.string();
    return c;
  }
  SourcePtr make(const config::SourceConfig& c) {
    std::string err;
    auto s = SystemSource::create_with_root(loop, c, dir, &err);
    EXPECT_TRUE(s) << err;
    return s;
  }
  // Starts a collection, runs `between` (the first collection's CPU window is open then), and
  // runs the loop until the collection ends.
  Collected collect_with(Source& s, const std::function<void()>& between) {
    std::optional<Collected> got;
    s.collect([&](Collected c) { got = std::move(c); });
    between();
    EXPECT_TRUE(run_until([&] { return got.has_value(); }));
    return got ? std::move(*got) : Collected{std::nullopt, "<never finished>"};
  }
};

TEST(ParseProcStat, SumsTheAggregateLine) {
  auto t = SystemSource::parse_proc_stat("cpu  10 1 5 100 4 1 1 2 7 0\ncpu0 1 2 3 4\n");
  ASSERT_TRUE(t);
  EXPECT_EQ(t->total, 10u + 1 + 5 + 100 + 4 + 1 + 1 + 2);  // guest is inside user already
  EXPECT_EQ(t->idle, 104u);
  // Old kernels have fewer columns.
  t = SystemSource::parse_proc_stat("cpu 1 2 3 4\n");
  ASSERT_TRUE(t);
  EXPECT_EQ(t->total, 10u);
  EXPECT_EQ(t->idle, 4u);
  EXPECT_FALSE(SystemSource::parse_proc_stat("cpu0 1 2 3 4 5\n"));
  EXPECT_FALSE(SystemSource::parse_proc_stat("cpu 1 2 x 4 5\n"));
  EXPECT_FALSE(SystemSource::parse_proc_stat("cpu 1 2\n"));
  EXPECT_FALSE(SystemSource::parse_proc_stat(""));
}

TEST_F(SystemSourceTest, SeveralDisksWithPrefixedKeys) {
  fs::create_directories(dir / "data");
  auto c = config({"disk"});
  edit<SystemSettings>(c).disks = {"/", (dir / "data").string()};
  auto s = make(c);
  const auto got = collect_once(*s);
  ASSERT_TRUE(got.record) << got.error;
  const auto v = by_key(*got.record);
  const std::string data = "disk_" + SystemSource::disk_key_name((dir / "data").string()) + "_";
  EXPECT_EQ(SystemSource::disk_key_name("/var/lib/tb-agent/"), "var_lib_tb_agent");
  EXPECT_EQ(v.count("disk_total"), 1u) << "disk_path keeps its keys";
  EXPECT_EQ(v.count("disk_root_total"), 1u);
  EXPECT_EQ(v.count("disk_root_used_percent"), 1u);
  EXPECT_EQ(v.count(data + "available"), 1u) << data;
  EXPECT_EQ(v.size(), 9u);

  edit<SystemSettings>(c).disks = {(dir / "missing").string()};
  auto bad = make(c);
  const auto failed = collect_once(*bad);
  EXPECT_FALSE(failed.record);
  EXPECT_NE(failed.error.find("missing"), std::string::npos) << failed.error;
}

TEST_F(SystemSourceTest, InterfacesIncludeAndExclude) {
  auto c = config({"network"});
  edit<SystemSettings>(c).interfaces = {"lo", "eth*", "br-*", "veth*"};
  edit<SystemSettings>(c).exclude_interfaces = {"veth*"};
  auto s = make(c);
  const auto got = collect_once(*s);
  ASSERT_TRUE(got.record) << got.error;
  const auto v = by_key(*got.record);
  EXPECT_EQ(std::get<std::int64_t>(v.at("net_lo_rx_bytes")), 5000) << "named, so included";
  EXPECT_EQ(v.count("net_eth0_rx_bytes"), 1u);
  EXPECT_EQ(v.count("net_br_lan_10_rx_bytes"), 1u);
  EXPECT_EQ(v.count("net_veth1a2b_rx_bytes"), 0u) << "excluded wins";
  EXPECT_EQ(v.size(), 3u * 8u);
}

TEST_F(SystemSourceTest, NoSwapIsZeroNotAnError) {
  write_file("proc/meminfo",
             "MemTotal: 2048000 kB\nMemAvailable: 512000 kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\n");
  auto s = make(config({"swap"}));
  const auto got = collect_once(*s);
  ASSERT_TRUE(got.record) << got.error;
  const auto v = by_key(*got.record);
  EXPECT_EQ(std::get<std::int64_t>(v.at("swap_total")), 0);
  EXPECT_DOUBLE_EQ(std::get<double>(v.at("swap_used_percent")), 0.0);
}

TEST_F(SystemSourceTest, PerCoreUsageWhenAsked) {
  stat(
      "cpu  200 0 200 1600 0 0 0 0 0 0\ncpu0 100 0 100 800 0 0 0 0 0 0\n"
      "cpu1 100 0 100 800 0 0 0 0 0 0\nintr 1\n");
  auto s = make(config({"cpu_cores"}));
  // cpu0: +100 ticks, 50 idle → 50%; cpu1: +100 ticks, 90 idle → 10%.
  const auto got = collect_with(*s, [&] {
    stat(
        "cpu  260 0 200 1740 0 0 0 0 0 0\ncpu0 150 0 100 850 0 0 0 0 0 0\n"
        "cpu1 110 0 100 890 0 0 0 0 0 0\nintr 1\n");
  });
  ASSERT_TRUE(got.record) << got.error;
  const auto v = by_key(*got.record);
  EXPECT_DOUBLE_EQ(std::get<double>(v.at("cpu0_usage")), 50.0);
  EXPECT_DOUBLE_EQ(std::get<double>(v.at("cpu1_usage")), 10.0);
  EXPECT_EQ(v.size(), 2u);
}

TEST_F(SystemSourceTest, EveryMetricWithExactValues) {
  auto s = make(config());
  const std::int64_t before = wall_ms();
  // The first collection samples /proc/stat, waits its window, samples again: 500 ticks passed,
  // 350 of them idle (idle + iowait) → 30% busy.
  const auto c = collect_with(*s, [&] { stat("cpu  200 0 150 1100 50 0 0 0 0 0\n"); });
  ASSERT_TRUE(c.record) << c.error;
  EXPECT_GE(c.record->ts_ms, before + SystemSource::kFirstCpuWindow.count());  // stamped when read
  EXPECT_EQ(c.record->source, "host");
  const auto v = by_key(*c.record);
  EXPECT_DOUBLE_EQ(std::get<double>(v.at("cpu_usage")), 30.0);
  EXPECT_EQ(std::get<std::int64_t>(v.at("memory_total")), 2048000ll * 1024);
  EXPECT_EQ(std::get<std::int64_t>(v.at("memory_available")), 512000ll * 1024);
  EXPECT_DOUBLE_EQ(std::get<double>(v.at("memory_used_percent")), 75.0);
  EXPECT_DOUBLE_EQ(std::get<double>(v.at("load_1")), 0.5);
  EXPECT_DOUBLE_EQ(std::get<double>(v.at("load_5")), 0.25);
  EXPECT_DOUBLE_EQ(std::get<double>(v.at("load_15")), 0.1);
  EXPECT_EQ(std::get<std::int64_t>(v.at("uptime")), 12345);
  EXPECT_DOUBLE_EQ(std::get<double>(v.at("cpu_temperature")), 55.5);  // the package zone
  EXPECT_GT(std::get<std::int64_t>(v.at("disk_total")), 0);
  EXPECT_LE(std::get<std::int64_t>(v.at("disk_available")),
            std::get<std::int64_t>(v.at("disk_total")));
  const double disk = std::get<double>(v.at("disk_used_percent"));
  EXPECT_GE(disk, 0.0);
  EXPECT_LE(disk, 100.0);
  EXPECT_EQ(std::get<std::int64_t>(v.at("swap_total")), 1000000ll * 1024);
  EXPECT_EQ(std::get<std::int64_t>(v.at("swap_used")), 250000ll * 1024);
  EXPECT_DOUBLE_EQ(std::get<double>(v.at("swap_used_percent")), 25.0);
  EXPECT_EQ(std::get<std::int64_t>(v.at("net_eth0_rx_bytes")), 1000000);
  EXPECT_EQ(std::get<std::int64_t>(v.at("net_eth0_rx_packets")), 2000);
  EXPECT_EQ(std::get<std::int64_t>(v.at("net_eth0_rx_errors")), 3);
  EXPECT_EQ(std::get<std::int64_t>(v.at("net_eth0_rx_drops")), 4);
  EXPECT_EQ(std::get<std::int64_t>(v.at("net_eth0_tx_bytes")), 500000);
  EXPECT_EQ(std::get<std::int64_t>(v.at("net_eth0_tx_packets")), 1000);
  EXPECT_EQ(std::get<std::int64_t>(v.at("net_eth0_tx_errors")), 5);
  EXPECT_EQ(std::get<std::int64_t>(v.at("net_eth0_tx_drops")), 6);
  EXPECT_EQ(std::get<std::int64_t>(v.at("net_br_lan_10_tx_drops")), 2) << "'-' and '.' become _";
  EXPECT_EQ(v.count("net_lo_rx_bytes"), 0u) << "lo is left out by default";
  EXPECT_EQ(v.count("cpu0_usage"), 0u) << "per-core usage is opt-in";
  // 12 of before, 3 swap, 8 counters for each of eth0, br-lan.10 and veth1a2b.
  EXPECT_EQ(v.size(), 12u + 3u + 3u * 8u);

  // The next collection measures from the previous one's sample, without a window.
  stat("cpu  300 0 150 1200 100 0 0 0 0 0\n");  // +250 ticks, +150 idle → 40%
  const auto next = collect_once(*s);
  ASSERT_TRUE(next.record) << next.error;
  EXPECT_DOUBLE_EQ(std::get<double>(by_key(*next.record).at("cpu_usage")), 40.0);
}

TEST_F(SystemSourceTest, OnlyTheMetricsAsked) {
  auto s = make(config({"load", "uptime"}));
  const auto c = collect_once(*s);  // no cpu: no window
  ASSERT_TRUE(c.record) << c.error;
  const auto v = by_key(*c.record);
  EXPECT_EQ(v.size(), 4u);
  EXPECT_TRUE(v.count("load_15") && v.count("uptime"));
}

TEST_F(SystemSourceTest, AZoneNamedForTheCpuIsPreferredElseTheFirst) {
  fs::remove_all(dir / "sys/class/thermal/thermal_zone1");
  auto s = make(config({"temperature"}));
  auto c = collect_once(*s);
  ASSERT_TRUE(c.record) << c.error;
  EXPECT_DOUBLE_EQ(std::get<double>(by_key(*c.record).at("cpu_temperature")), 40.0);
  zone(2, "cpu-thermal", "61234");  // a Raspberry Pi's name for it
  c = collect_once(*s);
  ASSERT_TRUE(c.record) << c.error;
  EXPECT_DOUBLE_EQ(std::get<double>(by_key(*c.record).at("cpu_temperature")), 61.2);
}

TEST_F(SystemSourceTest, NoThermalZonesIsNormalUnlessAskedFor) {
  fs::remove_all(dir / "sys");
  auto all = make(config());
  auto c = collect_with(*all, [&] { stat("cpu  200 0 150 1100 50 0 0 0 0 0\n"); });
  ASSERT_TRUE(c.record) << c.error;
  EXPECT_FALSE(by_key(*c.record).count("cpu_temperature"));

  auto asked = make(config({"temperature"}));
  c = collect_once(*asked);
  EXPECT_FALSE(c.record);
  EXPECT_NE(c.error.find("no thermal zones"), std::string::npos) << c.error;
}

TEST_F(SystemSourceTest, UnreadableOrGarbageIsAnErrorThatSaysWhere) {
  fs::remove(dir / "proc/loadavg");
  write_file("proc/meminfo", "\x01\x02 garbage\n");
  auto s = make(config({"memory", "load", "uptime"}));
  const auto c = collect_once(*s);
  EXPECT_FALSE(c.record);
  EXPECT_NE(c.error.find("MemAvailable"), std::string::npos) << c.error;
  EXPECT_NE(c.error.find((dir / "proc/loadavg").string()), std::string::npos) << c.error;
  EXPECT_EQ(c.error.find("uptime"), std::string::npos) << c.error;  // that one was fine

  write_file("proc/loadavg", "zero point five\n");
  write_file("proc/meminfo", "MemTotal: 100 kB\nMemAvailable: 50 kB\n");
  const auto again = collect_once(*s);
  EXPECT_FALSE(again.record);
  EXPECT_NE(again.error.find("cannot parse"), std::string::npos) << again.error;
}

TEST_F(SystemSourceTest, ABadDiskPathIsAnError) {
  auto c = config({"disk"});
  edit<SystemSettings>(c).disk_path = (dir / "does-not-exist").string();
  auto s = make(c);
  const auto got = collect_once(*s);
  EXPECT_FALSE(got.record);
  EXPECT_NE(got.error.find("does-not-exist"), std::string::npos) << got.error;
}

TEST_F(SystemSourceTest, AbortDuringTheCpuWindowEndsQuietly) {
  auto s = make(config({"cpu"}));
  bool called = false;
  s->collect([&](Collected) { called = true; });
  EXPECT_TRUE(s->collecting());
  s->abort();
  run_for(2 * SystemSource::kFirstCpuWindow);
  EXPECT_FALSE(called);
  EXPECT_FALSE(s->collecting());
  s.reset();  // and destroying it with nothing running is fine
}

TEST_F(SystemSourceTest, TheRealMachine) {
  auto c = config();
  edit<SystemSettings>(c).disk_path = "/";
  std::string err;
  auto s = make_source(loop, c, &err);  // through the registry, reading the real /proc
  ASSERT_TRUE(s) << err;
  const auto got = collect_once(*s);
  ASSERT_TRUE(got.record) << got.error;
  const auto v = by_key(*got.record);
  for (const char* key : {"cpu_usage", "memory_used_percent", "disk_used_percent"}) {
    ASSERT_TRUE(v.count(key)) << key;
    EXPECT_GE(as_number(v.at(key)), 0.0) << key;
    EXPECT_LE(as_number(v.at(key)), 100.0) << key;
  }
  EXPECT_GT(as_number(v.at("uptime")), 0.0);
  EXPECT_GT(as_number(v.at("memory_total")), 0.0);
  EXPECT_GE(as_number(v.at("load_1")), 0.0);
}

}  // namespace
}  // namespace tb::sources::testing
