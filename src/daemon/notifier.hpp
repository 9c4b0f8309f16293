// sd_notify(3) for the service manager: READY=1, STATUS=, RELOADING=1, STOPPING=1. Harmless when
// not run by systemd (no NOTIFY_SOCKET). The watchdog itself is sd-event's (sd_event_set_watchdog):
// it pings from the loop, so a stalled loop stops the pings.
#pragma once

#include <string>

namespace tb::daemon {

class Notifier {
 public:
  void ready();
  void reloading();
  void stopping();
  // Sends STATUS= only when the text changed.
  void status(const std::string& text);

 private:
  std::string status_;
};

}  // namespace tb::daemon
