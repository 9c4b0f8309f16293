#include "util/timer.hpp"

#include <spdlog/spdlog.h>

#include <exception>

namespace tb {

Timer::Timer(sd_event* loop, std::function<void()> callback, Millis accuracy, clockid_t clock,
             int priority)
    : loop_(loop), callback_(std::move(callback)), clock_(clock) {
  const std::uint64_t acc = static_cast<std::uint64_t>(accuracy.count()) * 1000;
  if (sd_event_add_time(loop_, &source_, clock_, UINT64_MAX, acc ? acc : 1, &Timer::on_fire, this) <
      0) {
    source_ = nullptr;
    spdlog::critical("cannot create a timer on the event loop");
    return;
  }
  sd_event_source_set_enabled(source_, SD_EVENT_OFF);
  sd_event_source_set_priority(source_, priority);
}

Timer::~Timer() { sd_event_source_disable_unref(source_); }

void Timer::arm_in(Millis delay) {
  if (!source_) return;
  std::uint64_t now = 0;
  sd_event_now(loop_, clock_, &now);
  const std::int64_t ms = delay.count() < 0 ? 0 : delay.count();
  sd_event_source_set_time(source_, now + static_cast<std::uint64_t>(ms) * 1000);
  sd_event_source_set_enabled(source_, SD_EVENT_ONESHOT);
}

void Timer::disarm() {
  if (source_) sd_event_source_set_enabled(source_, SD_EVENT_OFF);
}

bool Timer::armed() const {
  int enabled = SD_EVENT_OFF;
  if (source_) sd_event_source_get_enabled(source_, &enabled);
  return enabled != SD_EVENT_OFF;
}

int Timer::on_fire(sd_event_source*, std::uint64_t, void* userdata) {
  auto* self = static_cast<Timer*>(userdata);
  try {
    if (self->callback_) self->callback_();
  } catch (const std::exception& e) {
    spdlog::error("internal error in a timer callback: {}", e.what());
  } catch (...) {
    spdlog::error("internal error in a timer callback");
  }
  return 0;
}

}  // namespace tb
