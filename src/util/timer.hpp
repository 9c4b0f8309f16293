// A one-shot sd-event timer with a std::function callback. The C callback catches everything, so no
// exception ever unwinds into sd-event.
#pragma once

#include <time.h>
#include <functional>

#include <systemd/sd-event.h>

#include "util/clock.hpp"

namespace tb {

class Timer {
 public:
  // `accuracy` lets sd-event coalesce wake-ups (architecture.md, "One loop").
  Timer(sd_event* loop, std::function<void()> callback, Millis accuracy = Millis(1),
        clockid_t clock = CLOCK_BOOTTIME, int priority = 0);
  ~Timer();
  Timer(const Timer&) = delete;
  Timer& operator=(const Timer&) = delete;

  // (Re)arms the timer to fire once after `delay`.
  void arm_in(Millis delay);
  void disarm();
  bool armed() const;

 private:
  static int on_fire(sd_event_source* s, std::uint64_t usec, void* userdata);
  sd_event* loop_;
  std::function<void()> callback_;
  clockid_t clock_;
  sd_event_source* source_ = nullptr;
};

}  // namespace tb
