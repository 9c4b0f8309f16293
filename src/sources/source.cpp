#include "sources/source.hpp"

#include <time.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <utility>

#include <spdlog/spdlog.h>

#include "sources/text.hpp"
#include "util/log.hpp"
#include "util/units.hpp"

namespace tb::sources {

namespace {

std::uint64_t to_usec(Millis d) { return static_cast<std::uint64_t>(d.count()) * 1000; }

std::uint64_t boottime_now(sd_event* loop) {
  std::uint64_t now = 0;
  // The loop's cached iteration time: ticks are planned relative to when this iteration woke up.
  if (sd_event_now(loop, CLOCK_BOOTTIME, &now) < 0) {
    struct timespec ts {};
    clock_gettime(CLOCK_BOOTTIME, &ts);
    now = static_cast<std::uint64_t>(ts.tv_sec) * 1000000 +
          static_cast<std::uint64_t>(ts.tv_nsec) / 1000;
  }
  return now;
}

}  // namespace

std::string_view trim(std::string_view text) {
  constexpr std::string_view ws = " \t\n\r\f\v";
  const auto b = text.find_first_not_of(ws);
  if (b == std::string_view::npos) return {};
  const auto e = text.find_last_not_of(ws);
  return text.substr(b, e - b + 1);
}

std::string printable(std::string_view text, std::size_t max) {
  std::string out;
  out.reserve(std::min(text.size(), max) + 3);
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (out.size() >= max) {
      out += "…";
      break;
    }
    const auto c = static_cast<unsigned char>(text[i]);
    if (c == '\n' || c == '\t' || c == '\r')
      out += ' ';
    else if (c < 0x20 || c >= 0x7f)
      out += '?';
    else
      out += static_cast<char>(c);
  }
  return out;
}

std::string first_line(std::string_view text, std::size_t max) {
  while (!text.empty()) {
    const auto nl = text.find('\n');
    const auto line = trim(text.substr(0, nl));
    if (!line.empty()) return printable(line, max);
    if (nl == std::string_view::npos) break;
    text.remove_prefix(nl + 1);
  }
  return {};
}

Source::Source(sd_event* loop, config::SourceConfig config, std::string type)
    : loop_(loop), config_(std::move(config)) {
  status_.name = config_.name;
  status_.type = std::move(type);
  status_.interval = config_.interval;
}

Source::~Source() {
  sd_event_source_disable_unref(timer_);
  sd_event_source_disable_unref(defer_);
}

void Source::collect(CollectDone done) {
  if (collecting_) {
    post({false, std::move(done), {std::nullopt, "a collection is already running"}});
    return;
  }
  collecting_ = true;
  in_flight_ = true;
  done_ = std::move(done);
  try {
    begin();
  } catch (const std::exception& e) {
    if (in_flight_) complete({std::nullopt, std::string("internal error: ") + e.what()});
  } catch (...) {
    if (in_flight_) complete({std::nullopt, "internal error"});
  }
}

void Source::complete(Collected c) {
  if (!in_flight_) return;  // a subclass bug must not hand out a result twice
  in_flight_ = false;
  post({true, std::move(done_), std::move(c)});
  done_ = nullptr;
}

void Source::abort() {
  if (!collecting_) return;
  if (in_flight_) {
    in_flight_ = false;
    cancel();
  }
  std::erase_if(replies_, [](const Reply& r) { return r.collection; });
  done_ = nullptr;
  collecting_ = false;
}

// Results reach their callbacks through a defer source, one per loop iteration: never inside
// collect() (callers may hold locks or be iterating), and after sd-event has reaped an exec
// source's child (it does so right after the child callback returns).
void Source::post(Reply reply) {
  replies_.push_back(std::move(reply));
  if (!defer_) {
    if (sd_event_add_defer(loop_, &defer_, &Source::on_defer, this) < 0) {
      defer_ = nullptr;
      spdlog::critical("source '{}': cannot schedule a callback on the event loop", config_.name);
      return;
    }
    sd_event_source_set_priority(defer_, kCollectionPriority);
  }
  sd_event_source_set_enabled(defer_, SD_EVENT_ONESHOT);
}

int Source::on_defer(sd_event_source*, void* userdata) {
  auto* self = static_cast<Source*>(userdata);
  try {
    self->deliver_next();
  } catch (const std::exception& e) {
    spdlog::error("internal error delivering a collection: {}", e.what());
  } catch (...) {
    spdlog::error("internal error delivering a collection");
  }
  return 0;
}

void Source::deliver_next() {
  if (replies_.empty()) return;
  Reply r = std::move(replies_.front());
  replies_.pop_front();
  // Re-arm before calling out: the callback may destroy this source, so nothing touches `this`
  // after it.
  if (!replies_.empty()) sd_event_source_set_enabled(defer_, SD_EVENT_ONESHOT);
  if (r.collection) {
    collecting_ = false;
    account(r.result);
  }
  if (r.done) r.done(std::move(r.result));
}

void Source::account(const Collected& c) {
  if (c.record) {
    status_.readings += c.record->readings.size();
    status_.last_ts_ms = c.record->ts_ms;
    status_.last_error.clear();
  } else {
    ++status_.errors;
    status_.last_error = c.error;
  }
}

bool Source::start(std::function<void(telemetry::Record)> emit, std::string* error) {
  if (timer_) {
    if (error) *error = "already started";
    return false;
  }
  if (config_.interval.count() <= 0) {
    if (error) *error = "interval must be positive";
    return false;
  }
  const std::uint64_t interval = to_usec(config_.interval);
  // A window of a tenth of the interval (at most 1 s) lets sd-event wake once for several
  // sources (architecture.md, "One loop") without visibly shifting any of them.
  const std::uint64_t accuracy = std::clamp<std::uint64_t>(interval / 10, 1, 1000000);
  next_due_ = boottime_now(loop_) + interval;
  const int r = sd_event_add_time(loop_, &timer_, CLOCK_BOOTTIME, next_due_, accuracy,
                                  &Source::on_timer, this);
  if (r < 0) {
    timer_ = nullptr;
    if (error) *error = std::string("cannot create a timer: ") + strerror(-r);
    return false;
  }
  sd_event_source_set_priority(timer_, kCollectionPriority);
  sd_event_source_set_enabled(timer_, SD_EVENT_ON);
  emit_ = std::move(emit);
  skip_logged_ = false;
  // The first collection starts now rather than at the first tick: its result still arrives
  // from the loop (collect() never completes synchronously).
  if (!collecting_) collect([this](Collected c) { finish(std::move(c)); });
  return true;
}

void Source::stop() {
  timer_ = sd_event_source_disable_unref(timer_);
  abort();
  emit_ = nullptr;
}

int Source::on_timer(sd_event_source*, std::uint64_t, void* userdata) {
  auto* self = static_cast<Source*>(userdata);
  try {
    self->tick();
  } catch (const std::exception& e) {
    spdlog::error("internal error in source '{}' timer: {}", self->config_.name, e.what());
  } catch (...) {
    spdlog::error("internal error in source '{}' timer", self->config_.name);
  }
  return 0;
}

void Source::tick() {
  const std::uint64_t interval = to_usec(config_.interval);
  const std::uint64_t now = boottime_now(loop_);
  // Plan from the previous planned time, not from now: the accuracy window and the work done per
  // tick would otherwise add up to drift. After a stall (suspend counts on CLOCK_BOOTTIME) jump
  // to the next future tick instead of firing a burst of catch-up collections.
  next_due_ += interval;
  if (next_due_ <= now) next_due_ += ((now - next_due_) / interval + 1) * interval;
  sd_event_source_set_time(timer_, next_due_);
  sd_event_source_set_enabled(timer_, SD_EVENT_ON);

  if (collecting_) {
    ++status_.skipped;
    if (!skip_logged_) {
      log::FieldGuard field("TB_SOURCE", config_.name);
      spdlog::warn(
          "source '{}': a collection takes longer than the interval ({}); skipping ticks while "
          "one runs (logged once)",
          config_.name, format_duration(config_.interval));
      skip_logged_ = true;
    }
    return;
  }
  collect([this](Collected c) { finish(std::move(c)); });
}

void Source::finish(Collected c) {
  log::FieldGuard field("TB_SOURCE", config_.name);
  if (!c.record) {
    log_error(c.error);
    return;
  }
  if (failing_) {
    spdlog::info("source '{}' recovered after {} failed collection(s)", config_.name, failures_);
    failing_ = false;
    failures_ = 0;
    unreported_ = 0;
    reported_error_.clear();
  }
  // Nothing to send (e.g. a program that reported only nulls) is a success without a record.
  // A copy, so that emit may stop() or reconfigure this source without destroying the very
  // function that is running.
  if (emit_ && !c.record->readings.empty()) {
    auto emit = emit_;
    emit(std::move(*c.record));
  }
}

void Source::push(telemetry::Record record) {
  if (!emit_ || record.readings.empty()) return;
  status_.readings += record.readings.size();
  status_.last_ts_ms = record.ts_ms;
  auto emit = emit_;  // a copy: emit may stop() this source
  emit(std::move(record));
}

void Source::log_error(const std::string& error) {
  const std::uint64_t now = boottime_now(loop_);
  ++failures_;
  const bool repeat = failing_ && error == reported_error_;
  if (repeat && now - reported_at_ < to_usec(error_log_interval_)) {
    ++unreported_;
    return;
  }
  if (repeat)
    spdlog::error("source '{}': {} (still failing; {} failure(s) not logged)", config_.name, error,
                  unreported_);
  else
    spdlog::error("source '{}': {}", config_.name, error);
  failing_ = true;
  reported_error_ = error;
  reported_at_ = now;
  unreported_ = 0;
}

}  // namespace tb::sources
