// type: system — the host's own health, like collectd's cpu/memory/load/uptime/df/thermal
// plugins: read from /proc, statvfs() and /sys/class/thermal, all of which answer at once, so
// the reads are synchronous on the loop. Telemetry keys per metric are listed in docs/sources.md.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>

#include "sources/source.hpp"

namespace tb::sources {

class SystemSource final : public Source {
 public:
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

  std::filesystem::path root_;
  std::optional<CpuTimes> previous_cpu_;
  std::map<int, CpuTimes> previous_cores_;
  sd_event_source* cpu_window_ = nullptr;
};

}  // namespace tb::sources
