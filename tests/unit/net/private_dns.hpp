// A private mount namespace for name-resolution tests (root only): /etc/resolv.conf names a local
// UDP socket that never answers, /etc/nsswitch.conf asks only files and dns, and /etc/hosts is a
// file the test rewrites. Nothing leaves the machine; a name not in the hosts file hangs until
// the lookup gives up (or, after refuse(), fails at once).
//
// The namespace is the whole test process's, so use it only from tests that run in a process of
// their own (gtest_discover_tests runs each test that way).
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

namespace tb::testing {

class PrivateDns {
 public:
  PrivateDns() = default;
  ~PrivateDns() {
    if (fd_ >= 0) ::close(fd_);
    // Back to the real files, so the next test in this process can mount its own.
    for (int i = 0; i < mounted_; ++i) umount2(kFiles[i].dst, MNT_DETACH);
    std::error_code ec;
    if (!dir_.empty()) std::filesystem::remove_all(dir_, ec);
  }
  PrivateDns(const PrivateDns&) = delete;
  PrivateDns& operator=(const PrivateDns&) = delete;

  // False with *why when the test cannot have one (then skip).
  bool setup(std::string* why) {
    if (geteuid() != 0) {
      *why = "needs root (a private mount namespace, port 53)";
      return false;
    }
    if (unshare(CLONE_NEWNS) != 0 || mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr)) {
      *why = std::string("cannot make a private mount namespace: ") + std::strerror(errno);
      return false;
    }
    fd_ = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(53);
    const unsigned pid = static_cast<unsigned>(getpid());
    // One address per test process, so parallel tests do not share a port 53.
    const std::string ip = "127.77." + std::to_string((pid >> 8) & 0xff) + "." +
                           std::to_string(1 + (pid & 0xff) % 250);
    inet_pton(AF_INET, ip.c_str(), &a.sin_addr);
    if (bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
      *why = "cannot bind " + ip + ":53: " + std::strerror(errno);
      return false;
    }
    dir_ = std::filesystem::temp_directory_path() / ("tb-private-dns-" + std::to_string(pid));
    std::filesystem::create_directories(dir_);
    std::ofstream(dir_ / "resolv.conf")
        << "nameserver " << ip << "\noptions timeout:30 attempts:1\n";
    std::ofstream(dir_ / "nsswitch.conf") << "hosts: files dns\n";
    set_hosts("");
    for (const auto& f : kFiles) {
      const std::string src = (dir_ / f.name).string();
      if (mount(src.c_str(), f.dst, nullptr, MS_BIND, nullptr) != 0) {
        *why = std::string("cannot bind-mount ") + f.dst + ": " + std::strerror(errno);
        return false;
      }
      ++mounted_;
    }
    return true;
  }

  // /etc/hosts: localhost plus `extra` lines. Rewritten in place (the bind mount is the inode).
  void set_hosts(const std::string& extra) {
    std::ofstream(dir_ / "hosts", std::ios::trunc) << "127.0.0.1 localhost\n::1 localhost\n"
                                                   << extra;
  }

  // From now on the DNS server's port is closed: queries are refused at once.
  void refuse() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  struct File {
    const char* name;
    const char* dst;
  };
  static constexpr File kFiles[] = {{"resolv.conf", "/etc/resolv.conf"},
                                    {"nsswitch.conf", "/etc/nsswitch.conf"},
                                    {"hosts", "/etc/hosts"}};
  int mounted_ = 0;
  int fd_ = -1;
  std::filesystem::path dir_;
};

}  // namespace tb::testing
