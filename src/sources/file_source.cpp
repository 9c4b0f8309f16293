#include "sources/file_source.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstring>

#include "sources/source_type.hpp"
#include "sources/text.hpp"

namespace tb::sources {

namespace {

using config::Need;
using S = FileSettings;

const config::Keys<S> kFileKeys = {
    {"path", Need::Required, "absolute path", "",
     config::into(&S::path, config::text(config::check_absolute)), "The file to read."},
    {"key", Need::Required, "string", "",
     config::into(&S::key, config::text(config::check_printable)), "The telemetry key."},
    {"scale", Need::Optional, "number", "1", config::into(&S::scale, config::number(-1e300, 1e300)),
     "Multiplier, e.g. 0.001 for millidegrees."},
    {"offset", Need::Optional, "number", "0",
     config::into(&S::offset, config::number(-1e300, 1e300)), "Added after scaling."},
};

}  // namespace

const SourceType& FileSource::declaration() {
  static const SourceType type =
      declare("file", Collection::Periodic, kFileKeys, &FileSource::create);
  return type;
}

std::optional<std::variant<std::int64_t, double>> parse_number(std::string_view text) {
  std::string_view body = trim(text);
  // from_chars takes no leading '+'; sysfs never writes one, people sometimes do.
  if (!body.empty() && body.front() == '+') {
    body.remove_prefix(1);
    if (!body.empty() && body.front() == '-') return std::nullopt;
  }
  if (body.empty()) return std::nullopt;
  // Only digits, sign, '.', and an exponent: from_chars would accept "inf", "nan" and hex-ish
  // spellings we do not want a sensor file to produce silently.
  for (char c : body)
    if (!((c >= '0' && c <= '9') || c == '-' || c == '+' || c == '.' || c == 'e' || c == 'E'))
      return std::nullopt;
  const char* first = body.data();
  const char* last = body.data() + body.size();
  std::int64_t i = 0;
  if (auto [p, ec] = std::from_chars(first, last, i); ec == std::errc() && p == last) return i;
  double d = 0;
  if (auto [p, ec] = std::from_chars(first, last, d);
      ec == std::errc() && p == last && std::isfinite(d))
    return d;
  return std::nullopt;
}

SourcePtr FileSource::create(sd_event* loop, const config::SourceConfig& config,
                             std::string* error) {
  const auto& settings = *config::settings_of<FileSettings>(config);
  if (settings.path.empty()) {
    *error = "path is empty";
    return nullptr;
  }
  if (settings.key.empty()) {
    *error = "key is empty";
    return nullptr;
  }
  return SourcePtr(new FileSource(loop, config));
}

FileSource::FileSource(sd_event* loop, config::SourceConfig config)
    : Source(loop, std::move(config), "file"),
      settings_(static_cast<const FileSettings&>(*config_.settings)) {}

FileSource::~FileSource() = default;

void FileSource::begin() { complete(read_now()); }

Collected FileSource::read_now() const {
  const std::string& path = settings_.path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
  if (fd < 0) return {std::nullopt, "cannot open " + path + ": " + std::strerror(errno)};
  // One byte more than allowed tells "exactly 4 KiB" from "larger". sysfs reports st_size 4096
  // for every attribute, so the size is learnt by reading, not from fstat.
  std::array<char, kMaxSize + 1> buf;
  std::size_t len = 0;
  int err = 0;
  while (len < buf.size()) {
    const ssize_t n = ::read(fd, buf.data() + len, buf.size() - len);
    if (n < 0) {
      if (errno == EINTR) continue;
      err = errno;
      break;
    }
    if (n == 0) break;
    len += static_cast<std::size_t>(n);
  }
  const std::int64_t ts = wall_ms();
  ::close(fd);
  if (err) return {std::nullopt, "cannot read " + path + ": " + std::strerror(err)};
  if (len > kMaxSize) return {std::nullopt, path + " is larger than 4 KiB"};
  const std::string_view text(buf.data(), len);
  if (trim(text).empty()) return {std::nullopt, path + " is empty"};
  const auto raw = parse_number(text);
  if (!raw) return {std::nullopt, "cannot parse '" + printable(trim(text)) + "' as a number"};

  telemetry::Value value;
  const auto* as_int = std::get_if<std::int64_t>(&*raw);
  if (as_int && settings_.scale == 1.0 && settings_.offset == 0.0) {
    // Unscaled integers stay integers: ThingsBoard keeps longs and doubles apart.
    value = *as_int;
  } else {
    const double x = as_int ? static_cast<double>(*as_int) : std::get<double>(*raw);
    const double v = x * settings_.scale + settings_.offset;
    if (!std::isfinite(v))
      return {std::nullopt, "'" + printable(trim(text)) + "' * scale + offset is out of range"};
    value = v;
  }
  telemetry::Record rec;
  rec.ts_ms = ts;
  rec.source = config_.name;
  rec.readings.push_back({settings_.key, std::move(value)});
  return {std::move(rec), {}};
}

}  // namespace tb::sources
