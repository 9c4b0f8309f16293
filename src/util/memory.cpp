#include "util/memory.hpp"

#include <elf.h>
#include <link.h>
#include <malloc.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <string_view>
#include <vector>

namespace tb {

namespace {

struct Range {
  std::uintptr_t begin, end;
};

// Collects the read-only ranges of one loaded object into the std::vector<Range> at `data`.
int collect_readonly_segments(struct dl_phdr_info* info, std::size_t, void* data) {
  auto* drop = static_cast<std::vector<Range>*>(data);
  // The vDSO is the kernel's, not a file: nothing to give back.
  const std::string_view name = info->dlpi_name ? info->dlpi_name : "";
  if (name.rfind("linux-vdso", 0) == 0 || name.rfind("linux-gate", 0) == 0) return 0;
  const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
  Range relro{0, 0};
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const auto& ph = info->dlpi_phdr[i];
    if (ph.p_type == PT_GNU_RELRO)
      relro = {info->dlpi_addr + ph.p_vaddr, info->dlpi_addr + ph.p_vaddr + ph.p_memsz};
  }
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const auto& ph = info->dlpi_phdr[i];
    // Written or relocated pages are private copies: dropping them would lose their contents.
    if (ph.p_type != PT_LOAD || (ph.p_flags & PF_W)) continue;
    const std::uintptr_t at = info->dlpi_addr + ph.p_vaddr;
    // Whole pages inside the segment only: a page it shares with a neighbour is left alone.
    const std::uintptr_t begin = (at + page - 1) & ~(page - 1);
    const std::uintptr_t end = (at + ph.p_filesz) & ~(page - 1);
    if (end <= begin) continue;
    if (relro.end > begin && relro.begin < end) continue;
    try {
      drop->push_back({begin, end});
    } catch (...) {  // no exception through dl_iterate_phdr; what was found is still dropped
      return 1;
    }
  }
  return 0;  // and every library
}

}  // namespace

void release_startup_memory() {
  ::malloc_trim(0);
  // Every range is found first and dropped after: the objects' program headers and names lie in
  // pages that are dropped too (the dynamic loader's name is the program's PT_INTERP string), and
  // reading them afterwards would fault a 64 KiB window back.
  std::vector<Range> drop;
  drop.reserve(64);
  ::dl_iterate_phdr(&collect_readonly_segments, &drop);
  for (const Range& r : drop)
    ::madvise(reinterpret_cast<void*>(r.begin), r.end - r.begin, MADV_DONTNEED);
}

}  // namespace tb
