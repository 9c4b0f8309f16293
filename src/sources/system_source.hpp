// type: system — the host's own health, like collectd's cpu/memory/load/uptime/df/thermal
// plugins: read from /proc, statvfs() and /sys/class/thermal, all of which answer at once, so
// the reads are synchronous on the loop. Telemetry keys per metric are listed in docs/sources.md.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "sources/source.hpp"

namespace tb::sources {

struct SourceType;

// What a `system` source can report (docs/sources.md lists the telemetry keys of each).
// All but cpu_cores are reported by default (an empty `metrics`).
inline constexpr std::array<std::string_view, 9> kSystemMetrics = {
    "cpu", "memory", "load", "uptime", "disk", "temperature", "swap", "network", "cpu_cores"};

// Its keys: the table in system_source.cpp.
struct SystemSettings : config::SettingsOf<SystemSettings> {
  std::vector<std::string> metrics;     // from kSystemMetrics; empty = all this machine has
  std::string disk_path = "/";          // the file system `disk` reports on
  std::vector<std::string> disks;       // more file systems `disk` reports, with prefixed keys
  std::vector<std::string> interfaces;  // `network`: names or globs; empty = all but lo
  std::vector<std::string> exclude_interfaces;  // `network`: names or globs left out
  bool operator==(const SystemSettings&) const = default;
};

class SystemSource final : public Source {
 public:
  static const SourceType& declaration();
  static SourcePtr create(sd_event* loop, const config::SourceConfig& config, std::string* error);
  // For tests: /proc and /sys are read under `root` (disk_path is not; it is a real path).
  static SourcePtr create_with_root(sd_event* loop, const config::SourceConfig& config,
                                    std::filesystem::path root, std::string* error);
  ~SystemSource() override;

  // Aggregate CPU time from the first line of /proc/stat, in clock ticks.
  struct CpuTimes {
    std::uint64_t total = 0;
    std::uint64_t idle = 0;  // idle + iowait
  };
  // nullopt if the text has no parsable "cpu " line.
  static std::optional<CpuTimes> parse_proc_stat(std::string_view text);
  // The per-core lines (cpu0, cpu1, …) by core number; cores that are offline have no line.
  static std::map<int, CpuTimes> parse_proc_stat_cores(std::string_view text);
  // At most this many interfaces are reported (a host with thousands of veths must not make
  // records without bound); narrow them with `interfaces` / `exclude_interfaces`.
  static constexpr std::size_t kMaxInterfaces = 64;
  // An interface name as it appears in telemetry keys: [A-Za-z0-9_], anything else becomes '_'.
  static std::string key_name(std::string_view interface);
  // A mount path in `disks` as it appears in keys: "/" → "root", "/var/lib" → "var_lib".
  static std::string disk_key_name(std::string_view path);

  // How long the first collection waits between its two CPU samples, when there is no earlier
  // sample to measure from: usage is a rate, one sample says nothing.
  static constexpr Millis kFirstCpuWindow{250};

 protected:
  void begin() override;
  void cancel() override;

 private:
  SystemSource(sd_event* loop, config::SourceConfig config, std::filesystem::path root);
  bool wants(std::string_view metric) const;
  static int on_cpu_window(sd_event_source* s, std::uint64_t usec, void* userdata);
  // Reads everything selected and completes the collection.
  void finish_collection();

  const SystemSettings& settings_;
  std::filesystem::path root_;
  std::optional<CpuTimes> previous_cpu_;
  std::map<int, CpuTimes> previous_cores_;
  sd_event_source* cpu_window_ = nullptr;
};

}  // namespace tb::sources
