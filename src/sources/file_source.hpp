// type: file — one number from a small file (sysfs, iio, a file another program writes). The read
// is synchronous: sysfs attributes and small regular files answer at once, so it is fine on the
// loop; O_NONBLOCK keeps a FIFO from stalling it.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>

#include "sources/source.hpp"

namespace tb::sources {

struct SourceType;

// Its keys: the table in file_source.cpp.
struct FileSettings : config::SettingsOf<FileSettings> {
  std::string path;  // absolute
  std::string key;   // the telemetry key
  double scale = 1.0;
  double offset = 0.0;
  bool operator==(const FileSettings&) const = default;
};

class FileSource final : public Source {
 public:
  // Files larger than this are refused: a sensor value is a few bytes, and sysfs attributes are
  // at most a page.
  static constexpr std::size_t kMaxSize = 4096;

  static const SourceType& declaration();
  static SourcePtr create(sd_event* loop, const config::SourceConfig& config, std::string* error);
  ~FileSource() override;

  // Reads and converts once, synchronously (what begin() does); for tests and --test alike.
  Collected read_now() const;

 protected:
  void begin() override;
  void cancel() override {}

 private:
  FileSource(sd_event* loop, config::SourceConfig config);
  const FileSettings& settings_;
};

// One number, surrounding whitespace ignored: an optional sign, digits, optionally a fraction and
// an exponent ("21500", "-3", "+1.5", "2.5e3"). Integers that fit int64 stay integers. nullopt for
// anything else, including inf/nan and hex.
std::optional<std::variant<std::int64_t, double>> parse_number(std::string_view text);

}  // namespace tb::sources
