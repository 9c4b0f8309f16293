// Loading is table driven: every section is one Table of keys (name, required or not, setter).
// Adding a key is one line in its table plus a field in config.hpp. Sources are the exception:
// each item of `sources:` becomes a Value tree that its type reads with its own declaration
// table (src/sources/, config/schema.hpp), so a new source type touches nothing here. Defaults live
// in one place only: the member initializers in config.hpp (a key that is absent simply leaves its
// field alone), except device.name, which defaults to the hostname at load time.
//
// The loader never stops at the first problem: every setter reports into a shared Ctx and the
// walk goes on, so `--check-config` shows everything at once. A Config is returned only when
// nothing was reported.
#include "config/config.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml-cpp/eventhandler.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <string_view>
#include <utility>

#include "config/schema.hpp"
#include "util/units.hpp"
#include "util/utf8.hpp"

namespace tb::config {

std::string Diagnostic::to_string() const {
  std::string out = file;
  if (position.line > 0) {
    out += ':' + std::to_string(position.line);
    if (position.column > 0) out += ':' + std::to_string(position.column);
  }
  out += ": ";
  out += message;
  return out;
}

namespace {

// Anything bigger than this is not a config file or a secret; refusing it keeps a typo like
// `secret_file: /dev/zero` from eating memory.
constexpr std::size_t kMaxConfigBytes = 1 << 20;
constexpr std::size_t kMaxSecretBytes = 64 << 10;

Position to_position(const YAML::Mark& m) {
  if (m.is_null() || m.line < 0 || m.column < 0) return {};
  return {m.line + 1, m.column + 1};
}

// Reads a whole (small) file. On failure returns false and a sentence in *error.
// Only regular files: a FIFO without a writer would block the open (and a read) forever, which
// would hang --check-config and, through a reload, the whole loop; a device or socket is no
// config file either. O_NONBLOCK makes the open of a FIFO return at once so fstat can tell.
// Symlinks are followed: /run/credentials/… entries are commonly symlinked.
bool read_file(const std::filesystem::path& path, std::size_t max, std::string* out,
               std::string* error) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
  if (fd < 0) {
    *error = std::string("cannot open: ") + std::strerror(errno);
    return false;
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    *error = std::string("cannot stat: ") + std::strerror(errno);
    ::close(fd);
    return false;
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    *error = S_ISDIR(st.st_mode) ? "is a directory, not a file"
                                 : "is not a regular file (a FIFO, socket or device?)";
    return false;
  }
  if (static_cast<std::uint64_t>(st.st_size) > max) {
    ::close(fd);
    *error = "is larger than " + format_size(max) + "; is it the right file?";
    return false;
  }
  out->clear();
  char buf[8192];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      *error = std::string("cannot read: ") + std::strerror(errno);
      ::close(fd);
      return false;
    }
    if (n == 0) break;
    out->append(buf, static_cast<std::size_t>(n));
    if (out->size() > max) {
      ::close(fd);
      *error = "is larger than " + format_size(max) + "; is it the right file?";
      return false;
    }
  }
  ::close(fd);
  return true;
}

// Collects diagnostics for one load.
class Ctx final : public Report {
 public:
  explicit Ctx(std::string file) : file_(std::move(file)) {}

  // The items of `sources:` as trees, with what messages call each ("sources[2]").
  std::vector<std::pair<std::string, Value>> source_items;

  void error(Position at, std::string message) override {
    diagnostics_.push_back({file_, at, std::move(message)});
  }
  void error(const YAML::Mark& at, std::string message) {
    error(to_position(at), std::move(message));
  }
  // Checks that span keys stay quiet about values already reported as invalid: their field
  // still holds the default, and a message about that would mislead.
  bool has_error_at(const YAML::Mark& at) const {
    const Position p = to_position(at);
    return std::any_of(diagnostics_.begin(), diagnostics_.end(), [&](const Diagnostic& d) {
      return d.position.line == p.line && d.position.column == p.column;
    });
  }
  // Values that must never appear in a message, whatever path they might take into one.
  void add_secret(const std::string& s) {
    if (s.size() >= 3) secrets_.push_back(s);
  }

  std::vector<Diagnostic> finish() {
    // Defence in depth: no message is built from a secret, but a secret pasted in the wrong
    // place (say, as a device name) could still be quoted back.
    for (auto& d : diagnostics_) {
      for (const auto& s : secrets_) {
        for (auto at = d.message.find(s); at != std::string::npos;
             at = d.message.find(s, at + 10)) {
          d.message.replace(at, s.size(), "<redacted>");
        }
      }
    }
    // Document order reads best; checks that span keys run after the walk, so sort.
    std::stable_sort(diagnostics_.begin(), diagnostics_.end(),
                     [](const Diagnostic& a, const Diagnostic& b) {
                       return std::pair(a.position.line, a.position.column) <
                              std::pair(b.position.line, b.position.column);
                     });
    return std::move(diagnostics_);
  }

 private:
  std::string file_;
  std::vector<Diagnostic> diagnostics_;
  std::vector<std::string> secrets_;
};

// One key/value pair of a YAML map, with the dotted path messages call it by.
struct Item {
  YAML::Node key;
  YAML::Node value;
  std::string path;
  // yaml-cpp marks an empty value (`key:`) at the start of the next line; point at the key.
  YAML::Mark where() const { return value.IsNull() ? key.Mark() : value.Mark(); }
};

const char* kind(const YAML::Node& n) {
  switch (n.Type()) {
    case YAML::NodeType::Null:
      return "nothing";
    case YAML::NodeType::Scalar:
      return "a single value";
    case YAML::NodeType::Sequence:
      return "a list";
    case YAML::NodeType::Map:
      return "a map";
    default:
      return "nothing";
  }
}

// The text of a scalar value, or nullopt after reporting why there is none.
std::optional<std::string> scalar(Ctx& ctx, const Item& item, std::string_view expected) {
  if (item.value.IsScalar()) return item.value.Scalar();
  if (item.value.IsNull()) {
    ctx.error(item.where(), item.path + ": has no value; expected " + std::string(expected));
  } else {
    ctx.error(item.where(),
              item.path + ": expected " + std::string(expected) + ", not " + kind(item.value));
  }
  return std::nullopt;
}

// --- tables ---------------------------------------------------------------------------------

template <class T>
using Setter = std::function<void(Ctx&, const Item&, T&)>;

enum Need { Optional, Required };

template <class T>
struct Key {
  std::string_view name;
  Need need;
  Setter<T> set;
};

template <class T>
using Table = std::vector<Key<T>>;

// The items a map had, by key, for checks that span keys (backoff_max >= backoff_initial …).
using Seen = std::map<std::string, Item, std::less<>>;

struct WalkOptions {
  bool secret_section = false;  // do not quote unknown key names (they could be a pasted token)
};

// Applies `table` to every pair of `map` (a map or null = empty); reports unknown, duplicate
// and missing keys. `missing_at` is where a missing key is reported (the section's
// own key).
template <class T>
Seen walk(Ctx& ctx, const YAML::Node& map, const std::string& path, const Table<T>& table, T& out,
          const YAML::Mark& missing_at, const WalkOptions& opt = {}) {
  Seen seen;
  const std::string prefix = path.empty() ? "" : path + ".";
  const std::string where = path.empty() ? "" : path + ": ";
  if (map.IsMap()) {
    for (auto it = map.begin(); it != map.end(); ++it) {
      // A copy, not a reference: yaml-cpp's iterator hands out a temporary pair.
      const YAML::Node key = it->first;
      const YAML::Node value = it->second;
      if (!key.IsScalar()) {
        ctx.error(key.Mark(), where + "a key must be a plain name, not " + kind(key));
        continue;
      }
      const std::string name = key.Scalar();
      Item item{key, value, prefix + name};
      if (auto prev = seen.find(name); prev != seen.end()) {
        ctx.error(key.Mark(), item.path + ": duplicate key (first given at line " +
                                  std::to_string(to_position(prev->second.key.Mark()).line) + ")");
        continue;
      }
      const auto k =
          std::find_if(table.begin(), table.end(), [&](const Key<T>& c) { return c.name == name; });
      if (k == table.end()) {
        std::string known;
        for (const auto& c : table) {
          known += known.empty() ? "" : ", ";
          known += c.name;
        }
        const std::string what = opt.secret_section || !looks_like_key(name)
                                     ? "unknown key"
                                     : "unknown key " + shown(name);
        ctx.error(key.Mark(),
                  (path.empty() ? "" : path + ": ") + what + " (known keys: " + known + ")");
        continue;
      }
      seen.emplace(name, item);
      k->set(ctx, item, out);
    }
  }
  for (const auto& k : table) {
    if (k.need != Required || seen.count(k.name)) continue;
    ctx.error(missing_at, where + "missing required key '" + std::string(k.name) + "'");
  }
  return seen;
}

// --- value setters (one per kind of value) --------------------------------------------------

// A non-empty string. Secrets are never quoted back.
template <class T>
Setter<T> text(std::string T::*field, Check check = {}, bool secret = false) {
  return [=](Ctx& ctx, const Item& item, T& out) {
    auto v = scalar(ctx, item, "a string");
    if (!v) return;
    if (secret) ctx.add_secret(*v);
    if (v->empty()) {
      ctx.error(item.where(), item.path + ": must not be empty");
      return;
    }
    if (check) {
      if (auto problem = check(*v); !problem.empty()) {
        ctx.error(item.where(), item.path + ": " + problem);
        return;
      }
    }
    out.*field = std::move(*v);
  };
}

std::string check_host(const std::string& v) {
  if (v.find("://") != std::string::npos || v.find('/') != std::string::npos) {
    return "must be a host name or address, not a URL: " + shown(v) +
           " (the port goes in server.port)";
  }
  for (char c : v) {
    if (static_cast<unsigned char>(c) <= ' ') return "must not contain spaces: " + shown(v);
  }
  return "";
}

template <class T>
Setter<T> path_value(std::filesystem::path T::*field) {
  return [=](Ctx& ctx, const Item& item, T& out) {
    auto v = scalar(ctx, item, "a path");
    if (!v) return;
    if (v->empty()) {
      ctx.error(item.where(), item.path + ": must not be empty");
    } else if (auto problem = check_absolute(*v); !problem.empty()) {
      ctx.error(item.where(), item.path + ": " + problem);
    } else {
      out.*field = *v;
    }
  };
}

template <class T, class I>
Setter<T> integer(I T::*field, long long lo, long long hi) {
  return [=](Ctx& ctx, const Item& item, T& out) {
    auto v = scalar(ctx, item, "an integer");
    if (!v) return;
    long long n = 0;
    const char* end = v->data() + v->size();
    const auto [p, ec] = std::from_chars(v->data(), end, n);
    if (v->empty() || ec != std::errc() || p != end || n < lo || n > hi) {
      ctx.error(item.where(), item.path + ": must be an integer from " + std::to_string(lo) +
                                  " to " + std::to_string(hi) + ", not " + shown(*v));
      return;
    }
    out.*field = static_cast<I>(n);
  };
}

std::string number_text(double d) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", d);
  return buf;
}

// `lo_nonzero`: when set, 0 is allowed and any other value must be at least it.
template <class T>
Setter<T> number(double T::*field, double lo, double hi, double lo_nonzero = 0) {
  return [=](Ctx& ctx, const Item& item, T& out) {
    auto v = scalar(ctx, item, "a number");
    if (!v) return;
    std::string_view s = *v;
    if (!s.empty() && s.front() == '+') s.remove_prefix(1);  // YAML allows "+1.5"
    double d = 0;
    const auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), d);
    if (s.empty() || ec != std::errc() || p != s.data() + s.size() || !std::isfinite(d)) {
      ctx.error(item.where(), item.path + ": must be a number, not " + shown(*v));
      return;
    }
    if (d < lo || d > hi || (lo_nonzero > 0 && d != 0 && d < lo_nonzero)) {
      const std::string zero = lo_nonzero > 0 ? number_text(lo) + " or " : "";
      ctx.error(item.where(), item.path + ": must be " + zero + "from " +
                                  number_text(lo_nonzero > 0 ? lo_nonzero : lo) + " to " +
                                  number_text(hi) + ", not " + shown(*v));
      return;
    }
    out.*field = d;
  };
}

template <class T>
Setter<T> duration(Millis T::*field, Millis lo, Millis hi) {
  return [=](Ctx& ctx, const Item& item, T& out) {
    auto v = scalar(ctx, item, "a duration (e.g. 30s)");
    if (!v) return;
    std::string error;
    const auto d = parse_duration(*v, &error);
    if (!d) {
      ctx.error(item.where(), item.path + ": " + error);
      return;
    }
    if (*d < lo || *d > hi) {
      const std::string range = hi == Millis::max()
                                    ? "at least " + format_duration(lo)
                                    : "from " + format_duration(lo) + " to " + format_duration(hi);
      ctx.error(item.where(), item.path + ": must be " + range + ", not " + shown(*v));
      return;
    }
    out.*field = *d;
  };
}

template <class T>
Setter<T> size(std::uint64_t T::*field, std::uint64_t lo, std::uint64_t hi) {
  return [=](Ctx& ctx, const Item& item, T& out) {
    auto v = scalar(ctx, item, "a size (e.g. 64MiB)");
    if (!v) return;
    std::string error;
    const auto n = parse_size(*v, &error);
    if (!n) {
      ctx.error(item.where(), item.path + ": " + error);
      return;
    }
    if (*n < lo || *n > hi) {
      const std::string range = hi == UINT64_MAX
                                    ? "at least " + format_size(lo)
                                    : "from " + format_size(lo) + " to " + format_size(hi);
      ctx.error(item.where(), item.path + ": must be " + range + ", not " + shown(*v));
      return;
    }
    out.*field = *n;
  };
}

template <class T, class E>
Setter<T> choice(E T::*field, std::vector<std::pair<std::string_view, E>> options) {
  return [=](Ctx& ctx, const Item& item, T& out) {
    auto v = scalar(ctx, item, "one of its names");
    if (!v) return;
    std::string names;
    for (const auto& [name, value] : options) {
      if (name == *v) {
        out.*field = value;
        return;
      }
      names += names.empty() ? "" : ", ";
      names += name;
    }
    ctx.error(item.where(), item.path + ": must be one of " + names + ", not " + shown(*v));
  };
}

// A nested section. An empty section (`dbus:` with everything commented out) means defaults.
template <class T, class S>
Setter<T> section(S T::*field, const Table<S>& table,
                  std::function<void(Ctx&, const Item&, const Seen&, S&)> check = {},
                  bool secret = false) {
  return [=, &table](Ctx& ctx, const Item& item, T& out) {
    if (!item.value.IsMap() && !item.value.IsNull()) {
      ctx.error(item.where(), item.path + ": expected a map of keys, not " + kind(item.value));
      return;
    }
    WalkOptions opt;
    opt.secret_section = secret;
    const Seen seen = walk(ctx, item.value, item.path, table, out.*field, item.key.Mark(), opt);
    if (check) check(ctx, item, seen, out.*field);
  };
}

// --- sections -------------------------------------------------------------------------------

// Where distributions keep the system's CA bundle (Debian/Ubuntu, Fedora/RHEL, openSUSE, Alpine
// and others): server.dtls without ca_file/ca_dir trusts the first that exists.
constexpr std::array<const char*, 4> kSystemCaFiles{"/etc/ssl/certs/ca-certificates.crt",
                                                    "/etc/pki/tls/certs/ca-bundle.crt",
                                                    "/etc/ssl/ca-bundle.pem", "/etc/ssl/cert.pem"};

std::string octal_mode(mode_t mode) {
  char text[8];
  std::snprintf(text, sizeof text, "%04o", static_cast<unsigned>(mode & 07777));
  return text;
}

// A file the agent will open later (as its service user): it must be there and readable now, so
// that --check-config and a reload fail instead of a handshake hours later.
void check_readable(Ctx& ctx, const Item& item, const std::filesystem::path& path) {
  if (::access(path.c_str(), R_OK) != 0) {
    ctx.error(item.where(),
              item.path + ": cannot read " + path.string() + ": " + std::strerror(errno));
  }
}

void check_dtls(Ctx& ctx, const Item& item, const Seen& seen, DtlsConfig& out) {
  out.enabled = true;
  for (const char* key : {"ca_file", "ca_dir", "cert_file", "key_file"}) {
    const auto it = seen.find(key);
    if (it == seen.end() || ctx.has_error_at(it->second.where())) continue;
    const std::filesystem::path& path = key == std::string_view("ca_file")     ? out.ca_file
                                        : key == std::string_view("ca_dir")    ? out.ca_dir
                                        : key == std::string_view("cert_file") ? out.cert_file
                                                                               : out.key_file;
    check_readable(ctx, it->second, path);
  }
  const bool cert = seen.count("cert_file") != 0, key = seen.count("key_file") != 0;
  if (cert != key) {
    ctx.error(item.key.Mark(), item.path +
                                   ": cert_file and key_file go together (an X.509 "
                                   "client certificate and its private key); " +
                                   (cert ? "key_file" : "cert_file") + " is missing");
  }
  if (const auto it = seen.find("key_file"); it != seen.end() && !out.key_file.empty()) {
    struct stat st {};
    if (::stat(out.key_file.c_str(), &st) == 0 && (st.st_mode & (S_IRWXG | S_IRWXO)) != 0) {
      ctx.error(it->second.where(), it->second.path + ": the private key " + out.key_file.string() +
                                        " is open to group or others (mode " +
                                        octal_mode(st.st_mode) +
                                        "); chmod 600 it (owned by the agent's user)");
    }
  }
  if (out.ca_file.empty() && out.ca_dir.empty()) {
    for (const char* bundle : kSystemCaFiles) {
      if (::access(bundle, R_OK) == 0) {
        out.ca_file = bundle;
        break;
      }
    }
    if (out.ca_file.empty()) {
      ctx.error(item.key.Mark(), item.path +
                                     ": no ca_file or ca_dir is given and the system has no CA "
                                     "bundle (install ca-certificates, or set ca_file)");
    }
  }
}

const Table<DtlsConfig> kDtls = {
    {"ca_file", Optional, path_value(&DtlsConfig::ca_file)},
    {"ca_dir", Optional, path_value(&DtlsConfig::ca_dir)},
    {"server_name", Optional, text(&DtlsConfig::server_name, check_host)},
    {"cert_file", Optional, path_value(&DtlsConfig::cert_file)},
    {"key_file", Optional, path_value(&DtlsConfig::key_file)},
};

void check_server(Ctx&, const Item&, const Seen& seen, ServerConfig& out) {
  if (!out.dtls.enabled) return;
  // RFC 7252 §6.2: coaps' default port; ThingsBoard's COAP_DTLS_BIND_PORT (docs/thingsboard-coap.md
  // §6).
  if (seen.count("port") == 0) out.port = 5684;
  if (out.dtls.server_name.empty()) out.dtls.server_name = out.host;
}

const Table<ServerConfig> kServer = {
    {"host", Required, text(&ServerConfig::host, check_host)},
    {"port", Optional, integer(&ServerConfig::port, 1, 65535)},
    {"request_timeout", Optional, duration(&ServerConfig::request_timeout, 100ms, 10min)},
    {"max_response_size", Optional, size(&ServerConfig::max_response_size, 1 << 10, 16 << 20)},
    {"dtls", Optional, section(&ServerConfig::dtls, kDtls, std::function(check_dtls))},
};

const Table<DeviceConfig> kDevice = {
    {"name", Optional, text(&DeviceConfig::name, check_printable)},
};

// The secret is read now, not at use: a missing file must fail --check-config and a reload,
// not a provisioning attempt hours later.
void read_secret_file(Ctx& ctx, const Item& item, ProvisioningConfig& out) {
  auto v = scalar(ctx, item, "a path");
  if (!v) return;
  if (v->empty()) {
    ctx.error(item.where(), item.path + ": must not be empty");
    return;
  }
  if (auto problem = check_absolute(*v); !problem.empty()) {
    ctx.error(item.where(), item.path + ": " + problem);
    return;
  }
  std::string secret, error;
  if (!read_file(*v, kMaxSecretBytes, &secret, &error)) {
    ctx.error(item.where(), item.path + ": " + shown(*v) + " " + error);
    return;
  }
  ctx.add_secret(secret);
  // `echo secret > file` and editors add a final newline that is not part of the secret.
  while (!secret.empty() && (secret.back() == '\n' || secret.back() == '\r')) secret.pop_back();
  ctx.add_secret(secret);
  if (secret.empty()) {
    ctx.error(item.where(), item.path + ": " + shown(*v) + " is empty");
    return;
  }
  // It goes into a JSON request, which must be UTF-8. Where it goes wrong is not shown: the
  // position would be part of the secret.
  if (!utf8::valid(secret)) {
    ctx.error(item.where(), item.path + ": " + shown(*v) + " is not UTF-8 text");
    return;
  }
  out.secret = std::move(secret);
  out.secret_file = *v;
}

// access_token | x509_certificate, and where it was given (checks that span sections point there).
template <class T>
Setter<T> credentials_type(CredentialsType T::*field, Position T::*at) {
  const Setter<T> pick = choice(field, {{"access_token", CredentialsType::AccessToken},
                                        {"x509_certificate", CredentialsType::X509Certificate}});
  return [=](Ctx& ctx, const Item& item, T& out) {
    out.*at = to_position(item.where());
    pick(ctx, item, out);
  };
}

const Table<ProvisioningConfig> kProvisioning = {
    {"key", Required, text(&ProvisioningConfig::key, {}, true)},
    {"secret", Optional, text(&ProvisioningConfig::secret, {}, true)},
    {"secret_file", Optional, read_secret_file},
    {"credentials_type", Optional,
     credentials_type(&ProvisioningConfig::credentials_type,
                      &ProvisioningConfig::credentials_type_at)},
};

void check_provisioning(Ctx& ctx, const Item& item, const Seen& seen, ProvisioningConfig& out) {
  out.present = true;
  const auto secret = seen.find("secret");
  const auto file = seen.find("secret_file");
  if (secret != seen.end() && file != seen.end()) {
    const Item& later =
        to_position(secret->second.key.Mark()).line > to_position(file->second.key.Mark()).line
            ? secret->second
            : file->second;
    ctx.error(later.key.Mark(),
              item.path + ": secret and secret_file are mutually exclusive; keep one");
  } else if (secret == seen.end() && file == seen.end()) {
    ctx.error(item.key.Mark(), item.path + ": missing required key 'secret' (or 'secret_file')");
  }
}

const Table<CredentialsConfig> kCredentials = {
    {"access_token", Optional, text(&CredentialsConfig::access_token, {}, true)},
    {"type", Optional, credentials_type(&CredentialsConfig::type, &CredentialsConfig::type_at)},
};

// X.509 identity needs DTLS (docs/thingsboard-coap.md §6.2: the client certificate is the one
// of the handshake), and a pre-registered device needs its certificate configured.
void check_credentials_types(Ctx& ctx, const Config& c) {
  const DtlsConfig& dtls = c.server.dtls;
  if (c.credentials.type == CredentialsType::X509Certificate) {
    if (!dtls.enabled || dtls.cert_file.empty() || dtls.key_file.empty()) {
      ctx.error(c.credentials.type_at,
                "credentials.type: x509_certificate needs server.dtls with cert_file and key_file "
                "(the certificate the device is registered with in ThingsBoard)");
    }
    if (!c.credentials.access_token.empty()) {
      ctx.error(c.credentials.type_at,
                "credentials.type: x509_certificate identifies the device by its certificate; "
                "remove credentials.access_token");
    }
  }
  if (c.provisioning.present &&
      c.provisioning.credentials_type == CredentialsType::X509Certificate && !dtls.enabled) {
    ctx.error(c.provisioning.credentials_type_at,
              "provisioning.credentials_type: x509_certificate needs server.dtls (the "
              "certificate is presented in the DTLS handshake)");
  }
}

const Table<QueueConfig> kQueue = {
    {"max_size", Optional, size(&QueueConfig::max_size, 64 << 10, UINT64_MAX)},
    {"max_age", Optional, duration(&QueueConfig::max_age, 1s, Millis::max())},
    {"order", Optional,
     choice(&QueueConfig::order, {{"oldest_first", DrainOrder::OldestFirst},
                                  {"newest_first", DrainOrder::NewestFirst}})},
    // 0 = unlimited. Otherwise at least one reading in 1000 s (the pause after a batch is
    // readings / rate, and a smaller rate would make it days long or overflow) and at most 1e9/s.
    {"drain_rate", Optional, number(&QueueConfig::drain_rate, 0, 1e9, 0.001)},
};

const Table<DeliveryConfig> kDelivery = {
    {"max_batch_size", Optional, size(&DeliveryConfig::max_batch_size, 64, 1 << 20)},
    {"flush_interval", Optional, duration(&DeliveryConfig::flush_interval, 0ms, 10min)},
    {"backoff_initial", Optional, duration(&DeliveryConfig::backoff_initial, 100ms, 1h)},
    {"backoff_max", Optional, duration(&DeliveryConfig::backoff_max, 100ms, 24h)},
    {"shutdown_timeout", Optional, duration(&DeliveryConfig::shutdown_timeout, 0ms, 10min)},
    {"max_in_flight", Optional, integer(&DeliveryConfig::max_in_flight, 1, 256)},
};

// True when `name` was given but its value was already reported.
bool invalid(const Ctx& ctx, const Seen& seen, std::string_view name) {
  const auto it = seen.find(name);
  return it != seen.end() && ctx.has_error_at(it->second.where());
}

void check_delivery(Ctx& ctx, const Item& section, const Seen& seen, DeliveryConfig& out) {
  if (out.backoff_max >= out.backoff_initial) return;
  if (invalid(ctx, seen, "backoff_max") || invalid(ctx, seen, "backoff_initial")) return;
  const auto max = seen.find("backoff_max");
  const auto initial = seen.find("backoff_initial");
  const YAML::Mark at = max != seen.end()       ? max->second.where()
                        : initial != seen.end() ? initial->second.where()
                                                : section.key.Mark();
  ctx.error(at, "delivery.backoff_max (" + format_duration(out.backoff_max) +
                    ") must be at least delivery.backoff_initial (" +
                    format_duration(out.backoff_initial) + ")");
}

const Table<DbusConfig> kDbus = {
    {"bus", Optional,
     choice(&DbusConfig::bus,
            {{"system", BusKind::System}, {"session", BusKind::Session}, {"none", BusKind::None}})},
};

const Table<LoggingConfig> kLogging = {
    {"level", Optional,
     choice<LoggingConfig, std::string>(&LoggingConfig::level, {{"trace", "trace"},
                                                                {"debug", "debug"},
                                                                {"info", "info"},
                                                                {"warning", "warning"},
                                                                {"error", "error"}})},
};

// --- sources --------------------------------------------------------------------------------
// config/ only turns each item into a Value tree with positions; the source types declare and
// read their own keys (src/sources/, through SourceTypes), after the walk, once plugin_dir is
// known.

// Bounds of one item's tree. The file is at most 1 MiB anyway; these keep a pathological one
// (thousands of nested flow lists) from costing deep recursion or much memory.
constexpr int kMaxTreeDepth = 32;
constexpr std::size_t kMaxTreeNodes = 10000;

bool to_tree(Ctx& ctx, const YAML::Node& node, const std::string& path, int depth,
             std::size_t& nodes, Value& out) {
  out.position = to_position(node.Mark());
  if (++nodes > kMaxTreeNodes) {
    ctx.error(node.Mark(),
              path + ": too many values (at most " + std::to_string(kMaxTreeNodes) + ")");
    return false;
  }
  if (depth > kMaxTreeDepth) {
    ctx.error(node.Mark(),
              path + ": nested too deeply (at most " + std::to_string(kMaxTreeDepth) + " levels)");
    return false;
  }
  if (node.IsNull()) {
    out.data = std::monostate{};
    return true;
  }
  if (node.IsScalar()) {
    const std::string& text = node.Scalar();
    out.text = text;
    out.data = text;
    if (node.Tag() == "!") return true;  // quoted: a string
    // Plain: YAML 1.2 core schema.
    if (text == "true" || text == "True" || text == "TRUE") {
      out.data = true;
    } else if (text == "false" || text == "False" || text == "FALSE") {
      out.data = false;
    } else if (text == "~" || text == "null" || text == "Null" || text == "NULL") {
      out.data = std::monostate{};
    } else {
      // from_chars takes no leading '+'; only digits, sign, '.' and exponents make a number
      // (not "inf", "nan" or hex spellings).
      std::string_view body = text;
      if (body.size() > 1 && body.front() == '+' && body[1] != '-') body.remove_prefix(1);
      const bool numeric = !body.empty() && std::all_of(body.begin(), body.end(), [](char c) {
        return (c >= '0' && c <= '9') || c == '-' || c == '+' || c == '.' || c == 'e' || c == 'E';
      });
      const char* last = body.data() + body.size();
      std::int64_t i = 0;
      double d = 0;
      if (auto [p, ec] = std::from_chars(body.data(), last, i);
          numeric && ec == std::errc() && p == last) {
        out.data = i;
      } else if (auto [q, ec2] = std::from_chars(body.data(), last, d);
                 numeric && ec2 == std::errc() && q == last && std::isfinite(d)) {
        out.data = d;
      }
    }
    return true;
  }
  if (node.IsSequence()) {
    Value::List list;
    for (std::size_t i = 0; i < node.size(); ++i) {
      Value v;
      if (!to_tree(ctx, node[i], path + "[" + std::to_string(i) + "]", depth + 1, nodes, v))
        return false;
      list.push_back(std::move(v));
    }
    out.data = std::move(list);
    return true;
  }
  if (node.IsMap()) {
    Value::Map map;
    for (auto it = node.begin(); it != node.end(); ++it) {
      // Copies, not references: yaml-cpp's iterator hands out a temporary pair.
      const YAML::Node key = it->first;
      const YAML::Node value = it->second;
      if (!key.IsScalar()) {
        ctx.error(key.Mark(), path + ": a key must be a plain name, not " + kind(key));
        continue;  // reported; the other keys are still read
      }
      Value::Entry entry(key.Scalar(), {});
      entry.key_position = to_position(key.Mark());
      if (!to_tree(ctx, value, path + "." + key.Scalar(), depth + 1, nodes, entry.second))
        return false;
      map.push_back(std::move(entry));
    }
    out.data = std::move(map);
    return true;
  }
  ctx.error(node.Mark(), path + ": not a value");
  return false;
}

// Collects the items; load() hands them to their types once the walk is done.
void parse_sources(Ctx& ctx, const Item& item, Config&) {
  if (item.value.IsNull()) return;  // `sources:` with every example commented out
  if (!item.value.IsSequence()) {
    ctx.error(item.where(), item.path + ": expected a list of sources, not " + kind(item.value));
    return;
  }
  for (std::size_t i = 0; i < item.value.size(); ++i) {
    const YAML::Node node = item.value[i];
    const std::string path = "sources[" + std::to_string(i) + "]";
    if (!node.IsMap()) {
      ctx.error(node.IsNull() ? item.value.Mark() : node.Mark(),
                path + ": expected a map (name:, type:, …), not " + kind(node));
      continue;
    }
    std::size_t nodes = 0;
    Value tree;
    if (!to_tree(ctx, node, path, 0, nodes, tree)) continue;  // reported
    ctx.source_items.emplace_back(path, std::move(tree));
  }
}

// Each item read by its type; names unique.
void read_sources(Ctx& ctx, const SourceTypes& types, Config& config) {
  std::map<std::string, int> names;  // name → line of first use
  for (const auto& [path, tree] : ctx.source_items) {
    auto source = types.parse(tree, path, SourceContext{config.plugin_dir}, ctx);
    // Names are unique even among items whose type was wrong (everything is reported at once).
    const Value::Map* map = tree.map();
    const auto name = std::find_if(map->begin(), map->end(),
                                   [](const Value::Entry& e) { return e.first == "name"; });
    if (name != map->end() && name->second.is_scalar() && !name->second.text.empty() &&
        check_printable(name->second.text).empty()) {
      const std::string& text = name->second.text;
      if (auto [first, fresh] = names.emplace(text, name->key_position.line); !fresh) {
        ctx.error(name->second.position, path + ".name: duplicate source name " + shown(text) +
                                             " (first used at line " +
                                             std::to_string(first->second) + ")");
      }
    }
    if (!source) continue;
    config.sources.push_back(std::move(*source));
  }
}

// --- downlink: attributes:, remote:, rpc:, downlink: (docs/attributes.md) -------

void parse_attributes(Ctx& ctx, const Item& item, Config& out) {
  if (item.value.IsNull()) return;
  if (!item.value.IsMap()) {
    ctx.error(item.where(),
              item.path + ": expected a map of attribute names to values, not " + kind(item.value));
    return;
  }
  std::size_t nodes = 0;
  Value v;
  if (to_tree(ctx, item.value, item.path, 0, nodes, v)) out.downlink.attributes = std::move(v);
}

// The settings a shared attribute may change (never the server or credentials).
bool remote_setting_known(const std::string& s) {
  if (s == "log_level" || s == "logging.level") return true;
  constexpr std::string_view prefix = "sources.", suffix = ".interval";
  return s.size() > prefix.size() + suffix.size() && s.rfind(prefix, 0) == 0 &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

void parse_remote(Ctx& ctx, const Item& item, Config& out) {
  if (item.value.IsNull()) return;
  if (!item.value.IsMap()) {
    ctx.error(item.where(),
              item.path + ": expected a map of shared attribute: setting, not " + kind(item.value));
    return;
  }
  for (auto it = item.value.begin(); it != item.value.end(); ++it) {
    const YAML::Node key = it->first, value = it->second;
    if (!key.IsScalar() || key.Scalar().empty()) {
      ctx.error(key.Mark(), item.path + ": expected an attribute name, not " + kind(key));
      continue;
    }
    const std::string path = item.path + "." + key.Scalar();
    if (!value.IsScalar() || !remote_setting_known(value.Scalar())) {
      ctx.error(value.IsNull() ? key.Mark() : value.Mark(),
                path +
                    ": must name a setting a shared attribute may change: log_level or "
                    "sources.NAME.interval");
      continue;
    }
    out.downlink.remote[key.Scalar()] = value.Scalar();
  }
}

// An RPC method's argv, read as exec sources read theirs (program_argv in schema.hpp).
void check_rpc_command(Ctx& ctx, const Item& item, RpcMethodConfig& out) {
  std::size_t nodes = 0;
  Value tree;
  if (!to_tree(ctx, item.value, item.path, 0, nodes, tree)) return;
  const Field field{tree, to_position(item.key.Mark()), item.path, ctx};
  if (auto argv = program_argv()(field)) out.command = std::move(*argv);
}

const Table<RpcMethodConfig> kRpcMethod = {
    {"command", Required, check_rpc_command},
    {"timeout", Optional, duration(&RpcMethodConfig::timeout, 100ms, Millis(10min))},
};

void parse_rpc(Ctx& ctx, const Item& item, Config& out) {
  if (item.value.IsNull()) return;
  if (!item.value.IsMap()) {
    ctx.error(item.where(),
              item.path + ": expected a map of method names, not " + kind(item.value));
    return;
  }
  for (auto it = item.value.begin(); it != item.value.end(); ++it) {
    const YAML::Node key = it->first, value = it->second;
    if (!key.IsScalar() || key.Scalar().empty()) {
      ctx.error(key.Mark(), item.path + ": expected a method name, not " + kind(key));
      continue;
    }
    const std::string& name = key.Scalar();
    const std::string path = item.path + "." + name;
    if (name == "getStatus" || name == "flush" || name == "reload") {
      ctx.error(key.Mark(), path + ": " + shown(name) + " is built in");
      continue;
    }
    if (!value.IsMap()) {
      ctx.error(value.IsNull() ? key.Mark() : value.Mark(),
                path + ": expected a map (command:, timeout:), not " + kind(value));
      continue;
    }
    RpcMethodConfig method;
    walk(ctx, value, path, kRpcMethod, method, key.Mark(), WalkOptions{});
    out.downlink.rpc[name] = std::move(method);
  }
}

const Table<DownlinkConfig> kDownlink = {
    {"reregister_interval", Optional,
     duration(&DownlinkConfig::reregister_interval, 10s, Millis(1h))},
};

const Table<Config> kTop = {
    {"server", Required, section(&Config::server, kServer, std::function(check_server))},
    {"device", Optional, section(&Config::device, kDevice)},
    {"provisioning", Optional,
     section(&Config::provisioning, kProvisioning, std::function(check_provisioning), true)},
    {"credentials", Optional, section(&Config::credentials, kCredentials, {}, true)},
    {"state_dir", Optional, path_value(&Config::state_dir)},
    {"plugin_dir", Optional, path_value(&Config::plugin_dir)},
    {"sources", Optional, parse_sources},
    {"queue", Optional, section(&Config::queue, kQueue)},
    {"delivery", Optional, section(&Config::delivery, kDelivery, std::function(check_delivery))},
    {"dbus", Optional, section(&Config::dbus, kDbus)},
    {"logging", Optional, section(&Config::logging, kLogging)},
    {"attributes", Optional, parse_attributes},
    {"remote", Optional, parse_remote},
    {"rpc", Optional, parse_rpc},
    {"downlink", Optional, section(&Config::downlink, kDownlink)},
};

// --- the document ---------------------------------------------------------------------------

LoadResult finish(Ctx& ctx, std::optional<Config> config) {
  LoadResult result;
  result.diagnostics = ctx.finish();
  if (result.diagnostics.empty()) result.config = std::move(config);
  return result;
}

// yaml-cpp's message for a tab in indentation ("illegal map value", …) does not say why.
std::string tab_hint(const std::string& text, int line) {
  std::size_t at = 0;
  for (int i = 0; i < line && at != std::string::npos; ++i) {
    at = text.find('\n', at);
    if (at != std::string::npos) ++at;
  }
  if (at == std::string::npos) return "";
  for (; at < text.size() && (text[at] == ' ' || text[at] == '\t'); ++at) {
    if (text[at] == '\t') return " (YAML does not allow tabs for indentation)";
  }
  return "";
}

// Counts documents and remembers where each starts; values are not needed.
class DocumentCounter : public YAML::EventHandler {
 public:
  std::vector<YAML::Mark> starts;
  void OnDocumentStart(const YAML::Mark& mark) override { starts.push_back(mark); }
  void OnDocumentEnd() override {}
  void OnNull(const YAML::Mark&, YAML::anchor_t) override {}
  void OnAlias(const YAML::Mark&, YAML::anchor_t) override {}
  void OnScalar(const YAML::Mark&, const std::string&, YAML::anchor_t,
                const std::string&) override {}
  void OnSequenceStart(const YAML::Mark&, const std::string&, YAML::anchor_t,
                       YAML::EmitterStyle::value) override {}
  void OnSequenceEnd() override {}
  void OnMapStart(const YAML::Mark&, const std::string&, YAML::anchor_t,
                  YAML::EmitterStyle::value) override {}
  void OnMapEnd() override {}
};

// Where the first thing that is not blank or a comment is, if anything.
std::optional<Position> first_content(const std::string& text) {
  int line = 1;
  std::size_t at = 0;
  while (at < text.size()) {
    std::size_t end = text.find('\n', at);
    if (end == std::string::npos) end = text.size();
    for (std::size_t i = at; i < end; ++i) {
      const char c = text[i];
      if (c == ' ' || c == '\t' || c == '\r') continue;
      if (c == '#') break;
      return Position{line, static_cast<int>(i - at) + 1};
    }
    at = end + 1;
    ++line;
  }
  return std::nullopt;
}

// A YAML stream is UTF-8 (YAML 1.2 §5.2), and every string of the config ends up in JSON or on
// D-Bus, which refuse anything else. One diagnostic per line with a bad byte, at most a few; the
// bytes are not shown (they could be part of a secret).
bool check_utf8(Ctx& ctx, const std::string& text) {
  constexpr int kMaxReported = 5;
  int reported = 0;
  int line = 1;
  for (std::size_t at = 0; at < text.size() && reported < kMaxReported;) {
    const std::size_t nl = text.find('\n', at);
    const std::size_t end = nl == std::string::npos ? text.size() : nl;
    const std::string_view rest(text.data() + at, end - at);
    if (const std::size_t bad = utf8::invalid_at(rest); bad != std::string_view::npos) {
      // The column counts characters, as an editor shows it.
      int column = 1;
      for (std::size_t i = at; i < at + bad; ++i)
        if ((static_cast<unsigned char>(text[i]) & 0xC0) != 0x80) ++column;
      ctx.error(Position{line, column},
                "not valid UTF-8 text (Latin-1 or another encoding?); save the file as UTF-8");
      ++reported;
    }
    if (nl == std::string::npos) break;
    at = nl + 1;
    ++line;
  }
  return reported == 0;
}

LoadResult load(const std::string& text, const std::string& name, const SourceTypes& types) {
  Ctx ctx(name);
  if (!check_utf8(ctx, text)) return finish(ctx, std::nullopt);
  YAML::Node root;
  std::vector<YAML::Mark> documents;
  try {
    root = YAML::Load(text);
    // Not YAML::LoadAll: on some malformed input (a stray ',' at the top level) yaml-cpp 0.7
    // yields empty documents forever, and LoadAll never returns. Two are enough to know.
    std::istringstream in(text);
    YAML::Parser parser(in);
    DocumentCounter counter;
    for (int i = 0; i < 2 && parser.HandleNextDocument(counter); ++i) {
    }
    documents = std::move(counter.starts);
  } catch (const YAML::ParserException& e) {
    // e.msg is yaml-cpp's sentence without its own "error at line …" prefix.
    ctx.error(e.mark, "YAML syntax error: " + e.msg + tab_hint(text, e.mark.line));
    return finish(ctx, std::nullopt);
  }
  if (root.IsNull()) {
    // Empty, only comments, `~`, or text yaml-cpp silently skips (that stray ',').
    if (const auto at = first_content(text); at && documents.size() > 1) {
      ctx.error(*at, "the top level must be a map of sections (server:, sources:, …)");
    } else {
      ctx.error(Position{}, "the configuration is empty; at least server.host is required");
    }
    return finish(ctx, std::nullopt);
  }
  if (documents.size() > 1) {
    ctx.error(documents[1], "only one YAML document is allowed; remove the second one");
  }
  if (!root.IsMap()) {
    ctx.error(root.Mark(), "the top level must be a map of sections (server:, sources:, …), not " +
                               std::string(kind(root)));
    return finish(ctx, std::nullopt);
  }
  Config config;
  config.file = name;
  walk(ctx, root, "", kTop, config, root.Mark());
  read_sources(ctx, types, config);
  check_credentials_types(ctx, config);

  if (config.device.name.empty()) {
    char host[HOST_NAME_MAX + 1] = {};
    if (::gethostname(host, sizeof host - 1) == 0 && host[0] != '\0') {
      config.device.name = host;
    } else {
      ctx.error(Position{}, "device.name is not set and the hostname is unavailable; set it");
    }
  }
  return finish(ctx, std::move(config));
}

LoadResult internal_error(const std::string& name, const char* what) {
  LoadResult result;
  result.diagnostics.push_back(
      {name, {}, std::string("internal error while reading the configuration: ") + what});
  return result;
}

}  // namespace

LoadResult load_string(const std::string& text, const std::string& name, const SourceTypes& types) {
  // Public API: nothing escapes; yaml-cpp and std::bad_alloc become a diagnostic.
  try {
    return load(text, name, types);
  } catch (const std::exception& e) {
    return internal_error(name, e.what());
  } catch (...) {
    return internal_error(name, "unknown exception");
  }
}

LoadResult load_file(const std::filesystem::path& path, const SourceTypes& types) {
  try {
    std::string text, error;
    if (!read_file(path, kMaxConfigBytes, &text, &error)) {
      LoadResult result;
      result.diagnostics.push_back({path.string(), {}, error});
      return result;
    }
    LoadResult result = load_string(text, path.string(), types);
    if (result.config) result.config->file = path;
    return result;
  } catch (const std::exception& e) {
    return internal_error(path.string(), e.what());
  } catch (...) {
    return internal_error(path.string(), "unknown exception");
  }
}

}  // namespace tb::config
