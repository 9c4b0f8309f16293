// release_startup_memory() (util/memory.hpp): it unmaps the read-only pages of the program and of
// every library, and nothing else. What it gives back is measured in bench/ (docs/performance.md);
// here: pages really go, and written or relocated memory keeps its contents.
#include "util/memory.hpp"

#include <gtest/gtest.h>

#include <cctype>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>

namespace tb {
namespace {

// Resident KiB of the mappings of `file` with permissions `perms` (e.g. "r-xp").
long resident_kib(const std::string& file, const char* perms) {
  std::ifstream in("/proc/self/smaps");
  std::string line;
  bool match = false;
  long total = 0;
  while (std::getline(in, line)) {
    const bool header = !line.empty() && std::isxdigit(static_cast<unsigned char>(line[0])) &&
                        line.find(':') > line.find(' ');
    if (header) {
      match = line.find(perms) != std::string::npos && line.find(file) != std::string::npos;
    } else if (match && line.rfind("Rss:", 0) == 0) {
      total += std::stol(line.substr(4));
    }
  }
  return total;
}

int written_global = 1;

struct Shape {
  virtual ~Shape() = default;
  virtual int sides() const = 0;
};
struct Square : Shape {
  int sides() const override { return 4; }
};

TEST(Memory, ReleaseDropsLibraryCodeAndKeepsWrittenAndRelocatedData) {
  // libc's code is shared and mostly resident in a test process: it must shrink.
  const long before = resident_kib("libc.so", "r-xp");
  ASSERT_GT(before, 256) << "libc's code is expected mostly resident before";
  written_global = 42;
  std::unique_ptr<Shape> shape = std::make_unique<Square>();  // vtable: relocated (RELRO)
  std::string heap_text(4096, 'x');

  release_startup_memory();

  const long after = resident_kib("libc.so", "r-xp");
  // Reading smaps runs libc code again, which faults some back (64 KiB or a folio at a time).
  EXPECT_LT(after + 128, before) << before << " KiB before, " << after << " KiB after";
  EXPECT_EQ(written_global, 42);
  EXPECT_EQ(shape->sides(), 4);
  EXPECT_EQ(heap_text, std::string(4096, 'x'));
  // Code given back comes back on use.
  char buf[32];
  std::snprintf(buf, sizeof buf, "%d-%s", 7, "ok");
  EXPECT_STREQ(buf, "7-ok");
}

}  // namespace
}  // namespace tb
