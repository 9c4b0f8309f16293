// Capped exponential backoff with full jitter (AWS architecture blog "Exponential Backoff And
// Jitter"; Fluent Bit's scheduler does the same): delay = uniform(0, min(cap, initial *
// 2^attempt)).
#pragma once

#include <cstdint>
#include <random>

#include "util/clock.hpp"

namespace tb {

class Backoff {
 public:
  Backoff(Millis initial, Millis cap, std::uint64_t seed = std::random_device{}());

  // The delay before the next attempt; grows the ceiling for the one after.
  Millis next();
  // The ceiling the next call to next() draws under (for logs and tests).
  Millis ceiling() const;
  void reset();
  unsigned attempts() const { return attempts_; }
  void configure(Millis initial, Millis cap);

 private:
  Millis initial_;
  Millis cap_;
  unsigned attempts_ = 0;
  std::mt19937_64 rng_;
};

}  // namespace tb
