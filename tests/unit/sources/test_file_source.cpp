#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include "harness.hpp"
#include "sources/file_source.hpp"
#include "util/clock.hpp"

namespace tb::sources::testing {
namespace {

class FileSourceTest : public LoopTest {
 protected:
  SourcePtr make(const config::SourceConfig& c) {
    std::string err;
    auto s = make_source(loop, c, &err);
    EXPECT_TRUE(s) << err;
    return s;
  }
};

TEST(ParseNumber, AcceptsIntegersAndDecimals) {
  EXPECT_EQ(std::get<std::int64_t>(*parse_number("21500\n")), 21500);
  EXPECT_EQ(std::get<std::int64_t>(*parse_number("  -3 \t")), -3);
  EXPECT_EQ(std::get<std::int64_t>(*parse_number("+7")), 7);
  EXPECT_DOUBLE_EQ(std::get<double>(*parse_number("21.5")), 21.5);
  EXPECT_DOUBLE_EQ(std::get<double>(*parse_number("-.5")), -0.5);
  EXPECT_DOUBLE_EQ(std::get<double>(*parse_number("2.5e3")), 2500.0);
  EXPECT_DOUBLE_EQ(std::get<double>(*parse_number("+1.5")), 1.5);
  // Too large for int64: still a number, as a double.
  EXPECT_DOUBLE_EQ(std::get<double>(*parse_number("99999999999999999999")), 1e20);
}

TEST(ParseNumber, RejectsEverythingElse) {
  for (const char* s : {"", "  \n", "abc", "-", "+", "+-1", "--1", "1.2.3", "0x10", "inf", "nan",
                        "1e", "12abc", "1 2", "1e999"})
    EXPECT_FALSE(parse_number(s).has_value()) << "'" << s << "'";
}

TEST_F(FileSourceTest, UnscaledIntegerStaysInteger) {
  auto s = make(file_config(write_file("v", "21500\n")));
  const auto before = wall_ms();
  const auto c = collect_once(*s);
  const auto after = wall_ms();
  ASSERT_TRUE(c.record) << c.error;
  EXPECT_EQ(c.record->source, "room");
  EXPECT_GE(c.record->ts_ms, before);
  EXPECT_LE(c.record->ts_ms, after);
  ASSERT_EQ(c.record->readings.size(), 1u);
  EXPECT_EQ(c.record->readings[0].key, "temperature");
  EXPECT_EQ(std::get<std::int64_t>(c.record->readings[0].value), 21500);
  EXPECT_EQ(s->status().readings, 1u);
  EXPECT_EQ(s->status().last_ts_ms, c.record->ts_ms);
  EXPECT_EQ(s->status().type, "file");
}

TEST_F(FileSourceTest, DecimalIsDouble) {
  auto s = make(file_config(write_file("v", "21.5")));
  const auto c = collect_once(*s);
  ASSERT_TRUE(c.record) << c.error;
  EXPECT_DOUBLE_EQ(std::get<double>(c.record->readings[0].value), 21.5);
}

TEST_F(FileSourceTest, ScaleMakesADouble) {
  auto s = make(file_config(write_file("v", "21500\n"), 0.001));
  const auto c = collect_once(*s);
  ASSERT_TRUE(c.record) << c.error;
  EXPECT_DOUBLE_EQ(std::get<double>(c.record->readings[0].value), 21.5);
}

TEST_F(FileSourceTest, ScaleAndOffset) {
  auto s = make(file_config(write_file("v", " 1000 \n"), 0.5, -273.15));
  const auto c = collect_once(*s);
  ASSERT_TRUE(c.record) << c.error;
  EXPECT_DOUBLE_EQ(std::get<double>(c.record->readings[0].value), 500 - 273.15);
}

TEST_F(FileSourceTest, OffsetAloneMakesADouble) {
  auto s = make(file_config(write_file("v", "10"), 1.0, 2.0));
  const auto c = collect_once(*s);
  ASSERT_TRUE(c.record) << c.error;
  EXPECT_DOUBLE_EQ(std::get<double>(c.record->readings[0].value), 12.0);
}

TEST_F(FileSourceTest, GarbageIsAnError) {
  auto s = make(file_config(write_file("v", "abc\n")));
  const auto c = collect_once(*s);
  ASSERT_FALSE(c.record);
  EXPECT_EQ(c.error, "cannot parse 'abc' as a number");
  EXPECT_EQ(s->status().errors, 1u);
  EXPECT_EQ(s->status().last_error, c.error);
}

TEST_F(FileSourceTest, LongBinaryGarbageIsCutAndPrintable) {
  std::string junk(3000, 'x');
  junk[5] = '\x01';
  junk[6] = '\n';
  auto s = make(file_config(write_file("v", junk)));
  const auto c = collect_once(*s);
  ASSERT_FALSE(c.record);
  EXPECT_EQ(c.error.rfind("cannot parse 'xxxxx? xxx", 0), 0u) << c.error;
  EXPECT_LT(c.error.size(), 80u) << c.error;
  EXPECT_NE(c.error.find("…' as a number"), std::string::npos) << c.error;
}

TEST_F(FileSourceTest, EmptyFileIsAnError) {
  const auto path = write_file("v", "\n");
  auto s = make(file_config(path));
  const auto c = collect_once(*s);
  ASSERT_FALSE(c.record);
  EXPECT_EQ(c.error, path + " is empty");
}

TEST_F(FileSourceTest, MissingFileSaysWhy) {
  const auto path = (dir / "nope").string();
  auto s = make(file_config(path));
  const auto c = collect_once(*s);
  ASSERT_FALSE(c.record);
  EXPECT_EQ(c.error, "cannot open " + path + ": No such file or directory");
}

TEST_F(FileSourceTest, UnreadableFileSaysWhy) {
  if (geteuid() == 0) GTEST_SKIP() << "root reads files regardless of their mode";
  const auto path = write_file("v", "1");
  ASSERT_EQ(chmod(path.c_str(), 0), 0);
  auto s = make(file_config(path));
  const auto c = collect_once(*s);
  ASSERT_FALSE(c.record);
  EXPECT_EQ(c.error, "cannot open " + path + ": Permission denied");
}

TEST_F(FileSourceTest, DirectoryIsAnError) {
  auto s = make(file_config(dir.string()));
  const auto c = collect_once(*s);
  ASSERT_FALSE(c.record);
  EXPECT_EQ(c.error, "cannot read " + dir.string() + ": Is a directory");
}

TEST_F(FileSourceTest, FileOf4KiBIsFineLargerIsNot) {
  std::string exact = "42";
  exact.resize(FileSource::kMaxSize, ' ');
  auto ok = make(file_config(write_file("exact", exact)));
  const auto c1 = collect_once(*ok);
  ASSERT_TRUE(c1.record) << c1.error;
  EXPECT_EQ(std::get<std::int64_t>(c1.record->readings[0].value), 42);

  const auto big = write_file("big", exact + " ");
  auto too_big = make(file_config(big));
  const auto c2 = collect_once(*too_big);
  ASSERT_FALSE(c2.record);
  EXPECT_EQ(c2.error, big + " is larger than 4 KiB");
}

TEST_F(FileSourceTest, FifoWithoutWriterDoesNotBlockTheLoop) {
  const auto path = (dir / "fifo").string();
  ASSERT_EQ(mkfifo(path.c_str(), 0600), 0);
  auto s = make(file_config(path));
  const auto c = collect_once(*s, 2s);
  ASSERT_FALSE(c.record);
  EXPECT_EQ(c.error, path + " is empty");
}

TEST_F(FileSourceTest, SecondCollectWhileOneRunsIsRefused) {
  auto s = make(file_config(write_file("v", "1")));
  std::optional<Collected> first, second;
  s->collect([&](Collected c) { first = std::move(c); });
  EXPECT_TRUE(s->collecting());
  s->collect([&](Collected c) { second = std::move(c); });
  EXPECT_FALSE(first || second);
  ASSERT_TRUE(run_until([&] { return first && second; }));
  EXPECT_TRUE(first->record);
  ASSERT_FALSE(second->record);
  EXPECT_EQ(second->error, "a collection is already running");
  EXPECT_FALSE(s->collecting());
  EXPECT_EQ(s->status().errors, 0u) << "the refusal is not a failed collection";
}

TEST_F(FileSourceTest, AbortedCollectionNeverCallsDone) {
  auto s = make(file_config(write_file("v", "1")));
  bool called = false;
  s->collect([&](Collected) { called = true; });
  s->abort();
  EXPECT_FALSE(s->collecting());
  run_for(100ms);
  EXPECT_FALSE(called);
  // And the source is usable again.
  const auto c = collect_once(*s);
  EXPECT_TRUE(c.record) << c.error;
}

TEST_F(FileSourceTest, DestroyedWithAPendingResult) {
  auto s = make(file_config(write_file("v", "1")));
  bool called = false;
  s->collect([&](Collected) { called = true; });
  s.reset();
  run_for(50ms);
  EXPECT_FALSE(called);
}

TEST_F(FileSourceTest, FactoryRefusesIncompleteConfig) {
  std::string err;
  auto c = file_config("");
  EXPECT_FALSE(make_source(loop, c, &err));
  EXPECT_EQ(err, "path is empty");
  c = file_config("/x");
  edit<FileSettings>(c).key.clear();
  EXPECT_FALSE(make_source(loop, c, &err));
  EXPECT_EQ(err, "key is empty");
}

}  // namespace
}  // namespace tb::sources::testing
