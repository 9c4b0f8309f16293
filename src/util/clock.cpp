#include "util/clock.hpp"

#include <time.h>

#include <cstdlib>

namespace tb {

std::int64_t wall_ms() {
  using namespace std::chrono;
  return duration_cast<milliseconds>(system_clock::now().time_since_epoch()).count();
}

std::uint64_t wall_us() {
  using namespace std::chrono;
  return static_cast<std::uint64_t>(
      duration_cast<microseconds>(system_clock::now().time_since_epoch()).count());
}

std::int64_t clock_floor_ms() { return TB_CLOCK_FLOOR_S * 1000ll; }

WallClockSteps::WallClockSteps() : offset_ms_(offset_ms()) {}

std::int64_t WallClockSteps::offset_ms() {
  timespec real{}, boot{};
  clock_gettime(CLOCK_REALTIME, &real);
  clock_gettime(CLOCK_BOOTTIME, &boot);
  return (static_cast<std::int64_t>(real.tv_sec) - boot.tv_sec) * 1000 +
         (real.tv_nsec - boot.tv_nsec) / 1000000;
}

std::int64_t WallClockSteps::take_step() {
  // Below this the two clocks were read a little apart, or NTP slewed: not a step.
  constexpr std::int64_t kToleranceMs = 1000;
  const std::int64_t now = offset_ms();
  const std::int64_t step = now - offset_ms_;
  offset_ms_ = now;
  return std::llabs(step) < kToleranceMs ? 0 : step;
}

}  // namespace tb
