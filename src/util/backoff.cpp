#include "util/backoff.hpp"

#include <algorithm>

namespace tb {

Backoff::Backoff(Millis initial, Millis cap, std::uint64_t seed)
    : initial_(initial), cap_(std::max(cap, initial)), rng_(seed) {}

Millis Backoff::ceiling() const {
  // Shift in steps so a long outage cannot overflow: once past the cap we stay there.
  Millis c = initial_;
  for (unsigned i = 0; i < attempts_ && c < cap_; ++i) c *= 2;
  return std::min(c, cap_);
}

Millis Backoff::next() {
  const Millis c = ceiling();
  ++attempts_;
  // Full jitter, but never zero: a zero delay would turn an outage into a tight retry loop.
  std::uniform_int_distribution<std::int64_t> dist(std::max<std::int64_t>(1, c.count() / 10),
                                                   std::max<std::int64_t>(1, c.count()));
  return Millis(dist(rng_));
}

void Backoff::reset() { attempts_ = 0; }

void Backoff::configure(Millis initial, Millis cap) {
  initial_ = initial;
  cap_ = std::max(cap, initial);
}

}  // namespace tb
