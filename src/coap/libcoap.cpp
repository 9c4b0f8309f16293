#define TB_LIBCOAP_NO_REDIRECT
#include "coap/libcoap.hpp"

#include <dlfcn.h>

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

const Libcoap& libcoap() { return g_loaded; }

}  // namespace tb::coap
