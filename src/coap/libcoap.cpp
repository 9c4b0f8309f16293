#define TB_LIBCOAP_NO_REDIRECT
#include "coap/libcoap.hpp"

#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>

#include <array>

namespace tb::coap {

namespace {

Libcoap g_loaded;
void* g_handle = nullptr;

struct Candidate {
  const char* soname;
  bool dtls;
};

constexpr Candidate kPlain{TB_LIBCOAP_PLAIN_SONAME, false};
constexpr Candidate kDtls{TB_LIBCOAP_DTLS_SONAME, true};

// Resolves every listed function from `handle`; false names the first one missing.
bool resolve(void* handle, Libcoap* out, std::string* missing) {
#define X(name)                                                            \
  out->name = reinterpret_cast<decltype(out->name)>(dlsym(handle, #name)); \
  if (!out->name) {                                                        \
    *missing = #name;                                                      \
    return false;                                                          \
  }
#include "coap/libcoap_table.inc"
#undef X
  return true;
}

bool adopt(const Candidate& c, int flags, std::string* why) {
  void* handle = dlopen(c.soname, flags);
  if (!handle) {
    if (why && !(flags & RTLD_NOLOAD)) {
      const char* e = dlerror();
      *why = e ? e : c.soname;
    }
    return false;
  }
  Libcoap lib;
  std::string missing;
  if (!resolve(handle, &lib, &missing)) {
    if (why) *why = std::string(c.soname) + " lacks " + missing + " (libcoap older than 4.3.1?)";
    dlclose(handle);
    return false;
  }
  lib.dtls = c.dtls;
  lib.soname = c.soname;
  g_loaded = std::move(lib);
  g_handle = handle;  // never closed: libcoap keeps global state for the life of the process
  return true;
}

}  // namespace

const Libcoap* load_libcoap(bool need_dtls, std::string* error) {
  auto fail = [&](std::string why) -> const Libcoap* {
    if (error) *error = std::move(why);
    return nullptr;
  };
  if (!g_handle) {
    // A build the process already has (RTLD_NOLOAD) wins; then the one the configuration needs.
    const bool loaded = adopt(kPlain, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD, nullptr) ||
                        adopt(kDtls, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD, nullptr);
    if (!loaded) {
      std::string why_plain, why_dtls;
      if (!(!need_dtls && adopt(kPlain, RTLD_NOW | RTLD_LOCAL, &why_plain)) &&
          !adopt(kDtls, RTLD_NOW | RTLD_LOCAL, &why_dtls)) {
        return fail("cannot load libcoap: " + (need_dtls ? why_dtls : why_plain + "; " + why_dtls));
      }
    }
  }
  if (need_dtls && !g_loaded.dtls) {
    return fail("coaps (server.dtls) needs libcoap's DTLS build " + std::string(kDtls.soname) +
                ", but this process already uses " + g_loaded.soname +
                ": restart the agent to switch from coap to coaps");
  }
  return &g_loaded;
}

NameCheck certificate_names(const unsigned char* der, std::size_t length, const std::string& name) {
  if (!g_handle || !g_loaded.dtls) return NameCheck::Unavailable;
  // OpenSSL 3's ABI (openssl/x509.h, x509v3.h); dlsym on libcoap's handle searches the libraries
  // it loaded, libcrypto among them. The agent itself never links OpenSSL.
  struct X509;
  using D2i = X509* (*)(X509**, const unsigned char**, long);
  using Free = void (*)(X509*);
  using CheckHost = int (*)(X509*, const char*, std::size_t, unsigned, char**);
  using CheckIp = int (*)(X509*, const char*, unsigned);
  static const auto d2i = reinterpret_cast<D2i>(dlsym(g_handle, "d2i_X509"));
  static const auto x509_free = reinterpret_cast<Free>(dlsym(g_handle, "X509_free"));
  static const auto check_host = reinterpret_cast<CheckHost>(dlsym(g_handle, "X509_check_host"));
  static const auto check_ip = reinterpret_cast<CheckIp>(dlsym(g_handle, "X509_check_ip_asc"));
  if (!d2i || !x509_free || !check_host || !check_ip || length > (1u << 20))
    return NameCheck::Unavailable;
  const unsigned char* p = der;
  X509* cert = d2i(nullptr, &p, static_cast<long>(length));
  if (!cert) return NameCheck::Unavailable;
  in6_addr any{};
  const bool is_ip =
      inet_pton(AF_INET, name.c_str(), &any) == 1 || inet_pton(AF_INET6, name.c_str(), &any) == 1;
  const int r = is_ip ? check_ip(cert, name.c_str(), 0)
                      : check_host(cert, name.c_str(), name.size(), 0, nullptr);
  x509_free(cert);
  return r == 1 ? NameCheck::Match : r == 0 ? NameCheck::Mismatch : NameCheck::Unavailable;
}

const Libcoap& libcoap() { return g_loaded; }

}  // namespace tb::coap
