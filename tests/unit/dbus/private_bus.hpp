// A private dbus-daemon on a socket in a temp dir, for the D-Bus unit tests.
#pragma once

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

namespace tb::test {

namespace fs = std::filesystem;

class PrivateBus {
 public:
  // start_now=false: the socket path is known (socket_address()) but nobody listens yet.
  explicit PrivateBus(bool start_now = true) {
    dir_ = fs::temp_directory_path() /
           ("tb-dbus-test-" + std::to_string(getpid()) + "-" + std::to_string(counter_++));
    fs::create_directories(dir_);
    socket_ = (dir_ / "bus").string();
    const fs::path conf = dir_ / "bus.conf";
    std::ofstream(conf) << "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus "
                           "Configuration 1.0//EN\"\n"
                           " \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n"
                           "<busconfig><type>session</type>"
                           "<listen>unix:path="
                        << socket_
                        << "</listen><auth>EXTERNAL</auth>"
                           "<policy context=\"default\"><allow send_destination=\"*\"/>"
                           "<allow own=\"*\"/><allow receive_sender=\"*\"/></policy>"
                           "</busconfig>\n";
    conf_ = conf;
    if (start_now) start();
  }
  ~PrivateBus() {
    stop();
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  const std::string& address() const { return address_; }
  std::string socket_address() const { return "unix:path=" + socket_; }
  // dbus-daemon replaces a stale socket file, so a restart listens on the same address.
  void start() {
    if (pid_ > 0) return;
    const fs::path& conf = conf_;
    int fds[2];
    if (pipe(fds) != 0) return;
    pid_ = fork();
    if (pid_ == 0) {
      close(fds[0]);
      const std::string cfg = "--config-file=" + conf.string();
      const std::string print = "--print-address=" + std::to_string(fds[1]);
      execlp("dbus-daemon", "dbus-daemon", cfg.c_str(), "--nofork", "--nopidfile", print.c_str(),
             static_cast<char*>(nullptr));
      _exit(127);
    }
    close(fds[1]);
    char buf[512];
    std::string line;
    ssize_t n;
    while (line.find('\n') == std::string::npos && (n = read(fds[0], buf, sizeof buf)) > 0)
      line.append(buf, static_cast<std::size_t>(n));
    close(fds[0]);
    address_ = line.substr(0, line.find('\n'));
  }
  void stop() {
    if (pid_ > 0) {
      kill(pid_, SIGTERM);
      waitpid(pid_, nullptr, 0);
      pid_ = -1;
    }
  }

 private:
  static inline int counter_ = 0;
  fs::path dir_;
  fs::path conf_;
  std::string socket_;
  std::string address_;
  pid_t pid_ = -1;
};

}  // namespace tb::test
