// Wall-clock and monotonic helpers. Readings carry wall time (ThingsBoard stores `ts` in Unix ms);
// timers use CLOCK_BOOTTIME via sd-event so a suspended device does not skew intervals.
#pragma once

#include <chrono>
#include <cstdint>

namespace tb {

using Millis = std::chrono::milliseconds;

// Unix epoch milliseconds, the unit ThingsBoard expects in `ts` (docs/thingsboard-coap.md §1).
std::int64_t wall_ms();
// Unix epoch microseconds, the unit of the D-Bus `LastSuccessTime` property.
std::uint64_t wall_us();

// The build time in Unix ms. A wall clock before it has not been set yet (an RTC-less board that
// booted in 1970): the same rule systemd applies to its own build time (docs/queue.md,
// "Timestamps and the clock").
std::int64_t clock_floor_ms();
inline bool wall_clock_set(std::int64_t wall) { return wall >= clock_floor_ms(); }

// Notices steps of the wall clock (NTP, an administrator, a board's first time sync). Only a step
// changes the distance between CLOCK_REALTIME and CLOCK_BOOTTIME; running, suspend and NTP's
// slewing (at most 0.5 ms/s) do not move it by a second between two looks.
class WallClockSteps {
 public:
  WallClockSteps();
  // The step since the last call in ms (> 0: forward), or 0.
  std::int64_t take_step();

 private:
  static std::int64_t offset_ms();
  std::int64_t offset_ms_;
};

}  // namespace tb
