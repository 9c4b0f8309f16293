#include "daemon/notifier.hpp"

#include <systemd/sd-daemon.h>
#include <time.h>

#include <string>

namespace tb::daemon {

void Notifier::ready() { sd_notify(0, "READY=1"); }

void Notifier::reloading() {
  // MONOTONIC_USEC lets newer systemd (Type=notify-reload) match the reload to its request.
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  const unsigned long long usec =
      static_cast<unsigned long long>(ts.tv_sec) * 1000000ull + ts.tv_nsec / 1000;
  sd_notifyf(0, "RELOADING=1\nMONOTONIC_USEC=%llu", usec);
}

void Notifier::stopping() { sd_notify(0, "STOPPING=1"); }

void Notifier::status(const std::string& text) {
  if (text == status_) return;
  status_ = text;
  sd_notifyf(0, "STATUS=%s", text.c_str());
}

}  // namespace tb::daemon
