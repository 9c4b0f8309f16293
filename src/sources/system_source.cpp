#include "sources/system_source.hpp"

#include <fnmatch.h>
#include <sys/statvfs.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstring>
#include <vector>

#include "sources/source_type.hpp"
#include "sources/text.hpp"
#include "util/fs.hpp"

namespace tb::sources {

namespace {

namespace fs = std::filesystem;

// A /proc or /sys file, whole (they are generated on read and answer at once); a missing one is
// an error here too.
std::optional<std::string> read_kernel_file(const fs::path& path, std::string* error) {
  auto text = read_file(path, error);
  if (!text && error->empty()) *error = "cannot open " + path.string() + ": no such file";
  return text;
}

std::optional<double> to_double(std::string_view s) {
  s = trim(s);
  double v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || !std::isfinite(v)) return std::nullopt;
  return v;
}

std::optional<std::uint64_t> to_u64(std::string_view s) {
  s = trim(s);
  std::uint64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc()) return std::nullopt;
  return v;
}

// Whitespace-separated fields of one line.
std::vector<std::string_view> fields(std::string_view line) {
  std::vector<std::string_view> out;
  std::size_t i = 0;
  while (i < line.size()) {
    while (i < line.size() && (line[i] == ' ' || line[i] == '\t')) ++i;
    const std::size_t start = i;
    while (i < line.size() && line[i] != ' ' && line[i] != '\t') ++i;
    if (i > start) out.push_back(line.substr(start, i - start));
  }
  return out;
}

// One decimal place is what a dashboard shows; the rest is noise in the database.
double round1(double v) { return std::round(v * 10.0) / 10.0; }

using Readings = std::vector<telemetry::Reading>;

// /proc/meminfo: MemTotal and MemAvailable (kB; MemAvailable since Linux 3.14).
bool read_memory(const fs::path& root, Readings& out, std::string* error) {
  auto text = read_kernel_file(root / "proc/meminfo", error);
  if (!text) return false;
  std::optional<std::uint64_t> total, available;
  std::string_view rest = *text;
  while (!rest.empty()) {
    const auto nl = rest.find('\n');
    const std::string_view line = rest.substr(0, nl);
    rest = nl == std::string_view::npos ? std::string_view{} : rest.substr(nl + 1);
    const auto f = fields(line);
    if (f.size() < 2) continue;
    if (f[0] == "MemTotal:") total = to_u64(f[1]);
    if (f[0] == "MemAvailable:") available = to_u64(f[1]);
  }
  if (!total || !available || *total == 0 || *available > *total) {
    *error = "cannot find MemTotal and MemAvailable in " + (root / "proc/meminfo").string();
    return false;
  }
  const auto total_b = static_cast<std::int64_t>(*total * 1024);
  const auto available_b = static_cast<std::int64_t>(*available * 1024);
  out.push_back({"memory_total", total_b});
  out.push_back({"memory_available", available_b});
  out.push_back({"memory_used_percent", round1(100.0 * static_cast<double>(*total - *available) /
                                               static_cast<double>(*total))});
  return true;
}

bool read_load(const fs::path& root, Readings& out, std::string* error) {
  auto text = read_kernel_file(root / "proc/loadavg", error);
  if (!text) return false;
  const auto f = fields(trim(*text));
  std::optional<double> l1, l5, l15;
  if (f.size() >= 3) l1 = to_double(f[0]), l5 = to_double(f[1]), l15 = to_double(f[2]);
  if (!l1 || !l5 || !l15) {
    *error = "cannot parse " + (root / "proc/loadavg").string() + ": '" + printable(*text) + "'";
    return false;
  }
  out.push_back({"load_1", *l1});
  out.push_back({"load_5", *l5});
  out.push_back({"load_15", *l15});
  return true;
}

bool read_uptime(const fs::path& root, Readings& out, std::string* error) {
  auto text = read_kernel_file(root / "proc/uptime", error);
  if (!text) return false;
  const auto f = fields(trim(*text));
  const auto up = f.empty() ? std::nullopt : to_double(f[0]);
  if (!up || *up < 0) {
    *error = "cannot parse " + (root / "proc/uptime").string() + ": '" + printable(*text) + "'";
    return false;
  }
  out.push_back({"uptime", static_cast<std::int64_t>(*up)});
  return true;
}

// /proc/meminfo: SwapTotal and SwapFree (kB). No swap is valid: all zero.
bool read_swap(const fs::path& root, Readings& out, std::string* error) {
  auto text = read_kernel_file(root / "proc/meminfo", error);
  if (!text) return false;
  std::optional<std::uint64_t> total, free;
  std::string_view rest = *text;
  while (!rest.empty()) {
    const auto nl = rest.find('\n');
    const auto f = fields(rest.substr(0, nl));
    rest = nl == std::string_view::npos ? std::string_view{} : rest.substr(nl + 1);
    if (f.size() < 2) continue;
    if (f[0] == "SwapTotal:") total = to_u64(f[1]);
    if (f[0] == "SwapFree:") free = to_u64(f[1]);
  }
  if (!total || !free || *free > *total) {
    *error = "cannot find SwapTotal and SwapFree in " + (root / "proc/meminfo").string();
    return false;
  }
  const std::uint64_t used = *total - *free;
  out.push_back({"swap_total", static_cast<std::int64_t>(*total * 1024)});
  out.push_back({"swap_used", static_cast<std::int64_t>(used * 1024)});
  out.push_back(
      {"swap_used_percent",
       *total ? round1(100.0 * static_cast<double>(used) / static_cast<double>(*total)) : 0.0});
  return true;
}

bool matches_any(const std::vector<std::string>& patterns, const std::string& name) {
  for (const auto& p : patterns)
    if (::fnmatch(p.c_str(), name.c_str(), 0) == 0) return true;
  return false;
}

// /proc/net/dev: per interface, the kernel's cumulative counters since boot (collectd's
// interface plugin sends the same): bytes, packets, errors, drops, received and transmitted.
bool read_network(const fs::path& root, const SystemSettings& config, Readings& out,
                  std::string* error) {
  const fs::path path = root / "proc/net/dev";
  auto text = read_kernel_file(path, error);
  if (!text) return false;
  std::size_t reported = 0;
  std::string_view rest = *text;
  while (!rest.empty()) {
    const auto nl = rest.find('\n');
    const std::string_view line = rest.substr(0, nl);
    rest = nl == std::string_view::npos ? std::string_view{} : rest.substr(nl + 1);
    const auto colon = line.find(':');
    if (colon == std::string_view::npos) continue;  // the two header lines
    const std::string name(trim(line.substr(0, colon)));
    if (name.empty()) continue;
    const bool included =
        config.interfaces.empty() ? name != "lo" : matches_any(config.interfaces, name);
    if (!included || matches_any(config.exclude_interfaces, name)) continue;
    const auto f = fields(line.substr(colon + 1));
    std::uint64_t v[16] = {};
    bool ok = f.size() >= 16;
    for (std::size_t i = 0; ok && i < 16; ++i) {
      const auto n = to_u64(f[i]);
      ok = n.has_value();
      if (ok) v[i] = *n;
    }
    if (!ok) {
      *error = "cannot parse the line of " + printable(name) + " in " + path.string();
      return false;
    }
    if (++reported > SystemSource::kMaxInterfaces) break;
    const std::string key = "net_" + SystemSource::key_name(name) + "_";
    // Receive: bytes packets errs drop …; transmit from field 8: bytes packets errs drop …
    for (const auto& [dir, base] : {std::pair{"rx", 0}, std::pair{"tx", 8}}) {
      const std::string k = key + dir + "_";
      out.push_back({k + "bytes", static_cast<std::int64_t>(v[base])});
      out.push_back({k + "packets", static_cast<std::int64_t>(v[base + 1])});
      out.push_back({k + "errors", static_cast<std::int64_t>(v[base + 2])});
      out.push_back({k + "drops", static_cast<std::int64_t>(v[base + 3])});
    }
  }
  return true;
}

bool read_disk(const std::string& path, const std::string& prefix, Readings& out,
               std::string* error) {
  struct statvfs st {};
  if (::statvfs(path.c_str(), &st) != 0) {
    *error = "cannot stat the file system of " + path + ": " + std::strerror(errno);
    return false;
  }
  const auto unit = static_cast<std::uint64_t>(st.f_frsize ? st.f_frsize : st.f_bsize);
  const std::uint64_t total = st.f_blocks * unit;
  // What an unprivileged writer (the service user) can still use, as df shows it.
  const std::uint64_t available = st.f_bavail * unit;
  const std::uint64_t used = (st.f_blocks - st.f_bfree) * unit;
  out.push_back({prefix + "total", static_cast<std::int64_t>(total)});
  out.push_back({prefix + "available", static_cast<std::int64_t>(available)});
  // df's Use%: used / (used + available), so the root reserve does not look free.
  const std::uint64_t usable = used + available;
  out.push_back(
      {prefix + "used_percent",
       usable ? round1(100.0 * static_cast<double>(used) / static_cast<double>(usable)) : 0.0});
  return true;
}

// The CPU's temperature in °C: the thermal zone whose type names the CPU or package
// (x86_pkg_temp, cpu-thermal, soc_thermal, …), else the first zone. False with an empty *error
// when the machine has no thermal zones at all (VMs, many servers).
bool read_temperature(const fs::path& root, Readings& out, std::string* error) {
  const fs::path dir = root / "sys/class/thermal";
  std::error_code ec;
  std::vector<fs::path> zones;
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (e.path().filename().string().rfind("thermal_zone", 0) == 0) zones.push_back(e.path());
  if (zones.empty()) {
    error->clear();
    return false;
  }
  std::sort(zones.begin(), zones.end());
  fs::path chosen = zones.front();
  for (const auto& z : zones) {
    std::string ignored;
    auto type = read_kernel_file(z / "type", &ignored);
    if (!type) continue;
    std::string t(trim(*type));
    std::transform(t.begin(), t.end(), t.begin(), [](unsigned char c) { return std::tolower(c); });
    if (t.find("cpu") != std::string::npos || t.find("pkg") != std::string::npos ||
        t.find("soc") != std::string::npos) {
      chosen = z;
      break;
    }
  }
  auto text = read_kernel_file(chosen / "temp", error);
  if (!text) return false;
  const auto milli = to_double(*text);
  if (!milli) {
    *error = "cannot parse " + (chosen / "temp").string() + ": '" + printable(*text) + "'";
    return false;
  }
  out.push_back({"cpu_temperature", round1(*milli / 1000.0)});
  return true;
}

}  // namespace

namespace {

// cpu user nice system idle iowait irq softirq steal [guest guest_nice]; guest time is already
// counted in user/nice, so it is not added again.
std::optional<SystemSource::CpuTimes> parse_cpu_fields(const std::vector<std::string_view>& f) {
  if (f.size() < 5) return std::nullopt;
  SystemSource::CpuTimes t;
  for (std::size_t i = 1; i < f.size() && i <= 8; ++i) {
    const auto v = to_u64(f[i]);
    if (!v) return std::nullopt;
    t.total += *v;
    if (i == 4 || i == 5) t.idle += *v;
  }
  return t;
}

// Busy percent between two samples; nullopt when there is no interval to measure over.
std::optional<double> usage(const SystemSource::CpuTimes& before,
                            const SystemSource::CpuTimes& now) {
  // Counters only grow; a smaller value means a different /proc (container moved, tests).
  if (now.total <= before.total || now.idle < before.idle) return std::nullopt;
  const double busy = static_cast<double>((now.total - before.total) - (now.idle - before.idle));
  const double pct = 100.0 * busy / static_cast<double>(now.total - before.total);
  return round1(std::clamp(pct, 0.0, 100.0));
}

}  // namespace

std::string SystemSource::key_name(std::string_view interface) {
  std::string out(interface);
  for (char& c : out)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '_') c = '_';
  return out;
}

std::string SystemSource::disk_key_name(std::string_view path) {
  while (!path.empty() && path.front() == '/') path.remove_prefix(1);
  while (!path.empty() && path.back() == '/') path.remove_suffix(1);
  return path.empty() ? "root" : key_name(path);
}

std::map<int, SystemSource::CpuTimes> SystemSource::parse_proc_stat_cores(std::string_view text) {
  std::map<int, CpuTimes> out;
  while (!text.empty()) {
    const auto nl = text.find('\n');
    const auto f = fields(text.substr(0, nl));
    text = nl == std::string_view::npos ? std::string_view{} : text.substr(nl + 1);
    if (f.empty() || f[0].size() < 4 || f[0].substr(0, 3) != "cpu") continue;
    int core = 0;
    const auto digits = f[0].substr(3);
    auto [p, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), core);
    if (ec != std::errc() || p != digits.data() + digits.size() || core < 0) continue;
    if (auto t = parse_cpu_fields(f)) out[core] = *t;
  }
  return out;
}

std::optional<SystemSource::CpuTimes> SystemSource::parse_proc_stat(std::string_view text) {
  const std::string_view line = text.substr(0, text.find('\n'));
  const auto f = fields(line);
  if (f.empty() || f[0] != "cpu") return std::nullopt;
  return parse_cpu_fields(f);
}

namespace {

using config::Need;
using S = SystemSettings;

std::string metric_names() {
  std::string names;
  for (auto m : kSystemMetrics) names += (names.empty() ? "" : ", ") + std::string(m);
  return names;
}

// metrics: names from kSystemMetrics, each once. Every bad one is reported.
std::optional<std::vector<std::string>> read_metrics(const config::Field& f) {
  const std::string names = metric_names();
  const config::Value::List* list = f.value.list();
  if (!list || list->empty()) {
    f.error("expected a non-empty list of " + names + ", not " +
            (list ? "an empty list" : config::kind(f.value)));
    return std::nullopt;
  }
  std::vector<std::string> metrics;
  bool ok = true;
  for (std::size_t i = 0; i < list->size(); ++i) {
    const config::Value& m = (*list)[i];
    const std::string path = f.path + "[" + std::to_string(i) + "]";
    if (!m.is_scalar()) {
      f.report.error(m.is_null() ? f.value.position : m.position,
                     path + ": expected one of " + names + ", not " + config::kind(m));
      ok = false;
    } else if (std::find(kSystemMetrics.begin(), kSystemMetrics.end(), m.text) ==
               kSystemMetrics.end()) {
      f.report.error(m.position,
                     path + ": unknown metric " + config::shown(m.text) + " (use " + names + ")");
      ok = false;
    } else if (std::find(metrics.begin(), metrics.end(), m.text) != metrics.end()) {
      f.report.error(m.position, path + ": " + config::shown(m.text) + " is listed twice");
      ok = false;
    } else {
      metrics.push_back(m.text);
    }
  }
  if (!ok) return std::nullopt;
  return metrics;
}

const config::Keys<S> kSystemKeys = {
    {"metrics", Need::Optional, "list of metric names", "", config::into(&S::metrics, read_metrics),
     "What to report; by default all but cpu_cores."},
    {"disk_path", Need::Optional, "absolute path", "/",
     config::into(&S::disk_path, config::text(config::check_absolute)),
     "A path on the file system `disk` reports."},
    {"disks", Need::Optional, "list of absolute paths", "",
     config::into(&S::disks, config::string_list("absolute paths", "an absolute path",
                                                 config::check_absolute, true)),
     "More file systems `disk` reports, with their own keys."},
    {"interfaces", Need::Optional, "list of interface names or globs", "",
     config::into(&S::interfaces, config::string_list("interface names", "an interface name",
                                                      config::check_printable)),
     "Which interfaces `network` reports; by default all but lo."},
    {"exclude_interfaces", Need::Optional, "list of interface names or globs", "",
     config::into(
         &S::exclude_interfaces,
         config::string_list("interface names", "an interface name", config::check_printable)),
     "Interfaces `network` leaves out."},
};

}  // namespace

const SourceType& SystemSource::declaration() {
  static const SourceType type =
      declare("system", Collection::Periodic, kSystemKeys, &SystemSource::create);
  return type;
}

SourcePtr SystemSource::create(sd_event* loop, const config::SourceConfig& config,
                               std::string* error) {
  return create_with_root(loop, config, "/", error);
}

SourcePtr SystemSource::create_with_root(sd_event* loop, const config::SourceConfig& config,
                                         std::filesystem::path root, std::string* error) {
  const auto* settings = config::settings_of<SystemSettings>(config);
  if (!settings) {
    *error = "not a system source's settings";
    return nullptr;
  }
  for (const auto& m : settings->metrics) {
    if (std::find(kSystemMetrics.begin(), kSystemMetrics.end(), m) == kSystemMetrics.end()) {
      *error = "unknown metric '" + m + "'";
      return nullptr;
    }
  }
  if (settings->disk_path.empty() || settings->disk_path.front() != '/') {
    *error = "disk_path must be an absolute path";
    return nullptr;
  }
  for (const auto& d : settings->disks) {
    if (d.empty() || d.front() != '/') {
      *error = "disks must be absolute paths";
      return nullptr;
    }
  }
  return SourcePtr(new SystemSource(loop, config, std::move(root)));
}

SystemSource::SystemSource(sd_event* loop, config::SourceConfig config, std::filesystem::path root)
    : Source(loop, std::move(config), "system"),
      settings_(static_cast<const SystemSettings&>(*config_.settings)),
      root_(std::move(root)) {}

SystemSource::~SystemSource() { cancel(); }

bool SystemSource::wants(std::string_view metric) const {
  // Per-core usage is opt-in: a many-core host would otherwise send dozens of keys by default.
  return (settings_.metrics.empty() && metric != "cpu_cores") ||
         std::find(settings_.metrics.begin(), settings_.metrics.end(), metric) !=
             settings_.metrics.end();
}

void SystemSource::begin() {
  if ((wants("cpu") && !previous_cpu_) || (wants("cpu_cores") && previous_cores_.empty())) {
    // The first collection: take a sample now and measure over a short window.
    std::string error;
    auto text = read_kernel_file(root_ / "proc/stat", &error);
    if (text) {
      previous_cpu_ = parse_proc_stat(*text);
      previous_cores_ = parse_proc_stat_cores(*text);
    }
    if (previous_cpu_ || !previous_cores_.empty()) {
      const int r =
          sd_event_add_time_relative(loop_, &cpu_window_, CLOCK_MONOTONIC,
                                     static_cast<std::uint64_t>(kFirstCpuWindow.count()) * 1000,
                                     1000, &SystemSource::on_cpu_window, this);
      if (r >= 0) {
        sd_event_source_set_priority(cpu_window_, kCollectionPriority);
        return;
      }
    }
  }
  finish_collection();
}

int SystemSource::on_cpu_window(sd_event_source*, std::uint64_t, void* userdata) {
  auto* self = static_cast<SystemSource*>(userdata);
  self->cpu_window_ = sd_event_source_disable_unref(self->cpu_window_);
  try {
    self->finish_collection();
  } catch (const std::exception& e) {
    self->complete({std::nullopt, std::string("internal error: ") + e.what()});
  }
  return 0;
}

void SystemSource::cancel() { cpu_window_ = sd_event_source_disable_unref(cpu_window_); }

void SystemSource::finish_collection() {
  telemetry::Record rec;
  rec.source = config_.name;
  std::vector<std::string> problems;
  auto attempt = [&](std::string_view metric, auto&& read) {
    if (!wants(metric)) return;
    std::string error;
    if (!read(error) && !error.empty()) problems.push_back(error);
  };

  attempt("cpu", [&](std::string& error) {
    auto text = read_kernel_file(root_ / "proc/stat", &error);
    if (!text) return false;
    const auto now = parse_proc_stat(*text);
    if (!now) {
      error = "cannot parse the cpu line of " + (root_ / "proc/stat").string();
      return false;
    }
    const auto before = previous_cpu_;
    previous_cpu_ = now;
    // Counters only grow; a smaller value means a different /proc (container moved, tests).
    if (!before || now->total <= before->total || now->idle < before->idle) {
      error.clear();  // no interval to measure over yet: the next collection has one
      return false;
    }
    const double busy =
        static_cast<double>((now->total - before->total) - (now->idle - before->idle));
    const double pct = 100.0 * busy / static_cast<double>(now->total - before->total);
    rec.readings.push_back({"cpu_usage", round1(std::clamp(pct, 0.0, 100.0))});
    return true;
  });
  attempt("cpu_cores", [&](std::string& error) {
    auto text = read_kernel_file(root_ / "proc/stat", &error);
    if (!text) return false;
    const auto now = parse_proc_stat_cores(*text);
    if (now.empty()) {
      error = "cannot find per-core cpu lines in " + (root_ / "proc/stat").string();
      return false;
    }
    const auto before = std::move(previous_cores_);
    previous_cores_ = now;
    bool any = false;
    for (const auto& [core, times] : now) {
      const auto it = before.find(core);
      if (it == before.end()) continue;  // just came online: measured from the next collection
      if (const auto pct = usage(it->second, times)) {
        rec.readings.push_back({"cpu" + std::to_string(core) + "_usage", *pct});
        any = true;
      }
    }
    error.clear();
    return any;
  });
  attempt("memory", [&](std::string& error) { return read_memory(root_, rec.readings, &error); });
  attempt("swap", [&](std::string& error) { return read_swap(root_, rec.readings, &error); });
  attempt("network",
          [&](std::string& error) { return read_network(root_, settings_, rec.readings, &error); });
  attempt("load", [&](std::string& error) { return read_load(root_, rec.readings, &error); });
  attempt("uptime", [&](std::string& error) { return read_uptime(root_, rec.readings, &error); });
  attempt("disk", [&](std::string& error) {
    bool ok = read_disk(settings_.disk_path, "disk_", rec.readings, &error);
    for (const auto& path : settings_.disks) {
      std::string e;
      if (!read_disk(path, "disk_" + disk_key_name(path) + "_", rec.readings, &e)) {
        error += (error.empty() ? "" : "; ") + e;
        ok = false;
      }
    }
    return ok;
  });
  attempt("temperature", [&](std::string& error) {
    if (read_temperature(root_, rec.readings, &error)) return true;
    // No thermal zones is normal unless the config asked for the temperature by name.
    if (error.empty() && !settings_.metrics.empty())
      error = "no thermal zones in " + (root_ / "sys/class/thermal").string();
    return false;
  });
  rec.ts_ms = wall_ms();

  // A metric that cannot be read makes the collection an error (counted, logged, on D-Bus):
  // keys that silently go missing would look like a healthy source.
  if (!problems.empty()) {
    std::string all;
    for (const auto& p : problems) all += (all.empty() ? "" : "; ") + p;
    complete({std::nullopt, all});
    return;
  }
  if (rec.readings.empty()) {
    complete({std::nullopt, "nothing to report yet (cpu usage needs a second sample)"});
    return;
  }
  complete({std::move(rec), {}});
}

}  // namespace tb::sources
