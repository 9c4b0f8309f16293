#include "attributes/facts.hpp"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <string_view>

#include "util/fs.hpp"

namespace tb::attributes {

namespace {

// Read once a minute (the facts are compared with what was published): plain reads, not an
// ifstream, whose locale and stream code would be faulted back into the loop's memory each time
// (docs/performance.md).
std::string os_pretty_name() {
  constexpr std::size_t kMaxOsRelease = 64 * 1024;  // os-release(5) is a few hundred bytes
  constexpr std::string_view kKey = "PRETTY_NAME=";
  for (const char* path : {"/etc/os-release", "/usr/lib/os-release"}) {
    std::string ignored;
    const auto text = read_file(path, &ignored, kMaxOsRelease);
    if (!text) continue;
    std::string_view rest = *text;
    while (!rest.empty()) {
      const std::size_t end = rest.find('\n');
      std::string_view line = rest.substr(0, end);
      rest = end == std::string_view::npos ? std::string_view() : rest.substr(end + 1);
      if (line.substr(0, kKey.size()) != kKey) continue;
      std::string_view v = line.substr(kKey.size());
      if (v.size() >= 2 && (v.front() == '"' || v.front() == '\'')) v = v.substr(1, v.size() - 2);
      return std::string(v.substr(0, 256));
    }
  }
  return "";
}

// Global addresses of interfaces that are up, loopback and link-local IPv6 left out; sorted so
// that an unchanged set compares equal.
std::vector<std::string> ip_addresses() {
  std::vector<std::string> out;
  ifaddrs* list = nullptr;
  if (getifaddrs(&list) != 0) return out;
  for (ifaddrs* a = list; a && out.size() < 32; a = a->ifa_next) {
    if (!a->ifa_addr || !(a->ifa_flags & IFF_UP) || (a->ifa_flags & IFF_LOOPBACK)) continue;
    char buf[INET6_ADDRSTRLEN] = {};
    if (a->ifa_addr->sa_family == AF_INET) {
      inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(a->ifa_addr)->sin_addr, buf, sizeof buf);
    } else if (a->ifa_addr->sa_family == AF_INET6) {
      const auto* in6 = reinterpret_cast<sockaddr_in6*>(a->ifa_addr);
      if (IN6_IS_ADDR_LINKLOCAL(&in6->sin6_addr)) continue;
      inet_ntop(AF_INET6, &in6->sin6_addr, buf, sizeof buf);
    } else {
      continue;
    }
    out.emplace_back(buf);
  }
  freeifaddrs(list);
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

}  // namespace

Facts collect_facts(const config::Config& cfg, const std::string& agent_version) {
  Facts f;
  f.agent_version = agent_version;
  char host[256] = {};
  if (gethostname(host, sizeof host - 1) == 0) f.hostname = host;
  utsname u{};
  if (uname(&u) == 0) f.kernel = u.release;
  f.os = os_pretty_name();
  f.ip_addresses = ip_addresses();
  for (const auto& s : cfg.sources)
    f.sources.emplace_back(s.name, s.interval);  // 0 for a type without one (execd)
  return f;
}

}  // namespace tb::attributes
