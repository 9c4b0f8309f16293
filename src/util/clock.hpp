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

}  // namespace tb
