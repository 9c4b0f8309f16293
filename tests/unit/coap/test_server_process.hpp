// tb-test-server as a child process for C++ tests: started on a free loopback port, driven by
// its control protocol (docs/test-server.md: one command line in, one answer line out), killed
// and reaped at the end. The binary's path comes from TB_TEST_SERVER.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace tb::test {

class TestServer {
 public:
  explicit TestServer(const std::vector<std::string>& args) {
    int in[2], out[2];
    if (pipe2(in, O_CLOEXEC) != 0 || pipe2(out, O_CLOEXEC) != 0) throw std::runtime_error("pipe");
    pid_ = fork();
    if (pid_ == 0) {
      dup2(in[0], 0);
      dup2(out[1], 1);
      std::vector<std::string> argv_s = {TB_TEST_SERVER, "--port", "0", "--quiet"};
      argv_s.insert(argv_s.end(), args.begin(), args.end());
      std::vector<char*> argv;
      for (auto& a : argv_s) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
    close(in[0]);
    close(out[1]);
    to_ = in[1];
    from_ = out[0];
    const std::string first = line();  // "listening on PORT"
    const auto sp = first.rfind(' ');
    if (first.rfind("listening on ", 0) != 0 || sp == std::string::npos)
      throw std::runtime_error("tb-test-server did not start: " + first);
    port_ = static_cast<std::uint16_t>(std::stoi(first.substr(sp + 1)));
  }
  ~TestServer() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    close(to_);
    close(from_);
  }
  TestServer(const TestServer&) = delete;
  TestServer& operator=(const TestServer&) = delete;

  std::uint16_t port() const { return port_; }

  // Sends one control command and returns its one-line answer.
  std::string command(const std::string& cmd) {
    const std::string l = cmd + "\n";
    if (write(to_, l.data(), l.size()) != static_cast<ssize_t>(l.size()))
      throw std::runtime_error("cannot write to tb-test-server");
    return line();
  }

 private:
  std::string line() {
    std::string out;
    for (;;) {
      pollfd p{from_, POLLIN, 0};
      if (poll(&p, 1, 20000) <= 0) throw std::runtime_error("tb-test-server did not answer");
      char c = 0;
      if (read(from_, &c, 1) != 1) throw std::runtime_error("tb-test-server closed its stdout");
      if (c == '\n') return out;
      out += c;
    }
  }

  pid_t pid_ = -1;
  int to_ = -1, from_ = -1;
  std::uint16_t port_ = 0;
};

}  // namespace tb::test
