// Fuzzes the number parser of file sources (tb::sources::parse_number): the input is the file.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <variant>

#include "fuzz_util.hpp"
#include "sources/file_source.hpp"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tb::fuzz::quiet_logs();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size > tb::sources::FileSource::kMaxSize) return -1;  // the source refuses such files
  const std::string_view text = tb::fuzz::as_text(data, size);
  const auto n = tb::sources::parse_number(text);
  if (n) {
    if (const double* d = std::get_if<double>(&*n)) TB_FUZZ_CHECK(std::isfinite(*d), "finite");
  }
  return 0;
}
