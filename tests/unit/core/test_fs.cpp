#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>

#include "util/fs.hpp"

namespace fs = std::filesystem;

namespace {
fs::path temp_dir() {
  char tmpl[] = "/tmp/tb-fs-XXXXXX";
  return fs::path(mkdtemp(tmpl));
}
}  // namespace

TEST(Fs, AtomicWriteSetsModeAndReplaces) {
  const auto dir = temp_dir();
  std::string err;
  ASSERT_TRUE(tb::write_file_atomic(dir / "a.json", "one", 0600, &err)) << err;
  ASSERT_TRUE(tb::write_file_atomic(dir / "a.json", "two", 0600, &err)) << err;
  auto text = tb::read_file(dir / "a.json", &err);
  ASSERT_TRUE(text);
  EXPECT_EQ(*text, "two");
  struct stat st {};
  ASSERT_EQ(stat((dir / "a.json").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  // No temporary files are left behind.
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 1);
  fs::remove_all(dir);
}

TEST(Fs, ReadMissingIsNotAnError) {
  std::string err = "x";
  EXPECT_FALSE(tb::read_file("/nonexistent/tb-agent/file", &err));
  EXPECT_TRUE(err.empty());
}

TEST(Fs, AtomicWriteIntoMissingDirectoryFails) {
  std::string err;
  EXPECT_FALSE(tb::write_file_atomic("/nonexistent/tb-agent/x", "y", 0600, &err));
  EXPECT_NE(err.find("/nonexistent/tb-agent"), std::string::npos) << err;
}
