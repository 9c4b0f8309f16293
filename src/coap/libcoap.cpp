#define TB_LIBCOAP_NO_REDIRECT
#include "coap/libcoap.hpp"

#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>

#include <array>
#include <vector>

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

bool check_pem_files(const std::string& ca_file, const std::string& cert_file,
                     const std::string& key_file, std::string* error) {
  if (!g_handle || !g_loaded.dtls) {
    *error = "libcoap's DTLS build is not loaded";
    return false;
  }
  // OpenSSL 3's ABI (openssl/pem.h, x509.h, bio.h), from libcrypto as loaded by libcoap.
  struct Bio;
  struct X509;
  struct Key;
  struct Time;
  using BioNewFile = Bio* (*)(const char*, const char*);
  using BioFree = int (*)(Bio*);
  using ReadX509 = X509* (*)(Bio*, X509**, void*, void*);
  using ReadKey = Key* (*)(Bio*, Key**, void*, void*);
  using X509Free = void (*)(X509*);
  using KeyFree = void (*)(Key*);
  using CheckKey = int (*)(const X509*, const Key*);
  using NotAfter = const Time* (*)(const X509*);
  using CmpNow = int (*)(const Time*);
  using ClearErrors = void (*)();
  const auto sym = [](const char* name) { return dlsym(g_handle, name); };
  const auto bio_new_file = reinterpret_cast<BioNewFile>(sym("BIO_new_file"));
  const auto bio_free = reinterpret_cast<BioFree>(sym("BIO_free"));
  const auto read_x509 = reinterpret_cast<ReadX509>(sym("PEM_read_bio_X509"));
  const auto read_key = reinterpret_cast<ReadKey>(sym("PEM_read_bio_PrivateKey"));
  const auto x509_free = reinterpret_cast<X509Free>(sym("X509_free"));
  const auto key_free = reinterpret_cast<KeyFree>(sym("EVP_PKEY_free"));
  const auto check_key = reinterpret_cast<CheckKey>(sym("X509_check_private_key"));
  const auto not_after = reinterpret_cast<NotAfter>(sym("X509_get0_notAfter"));
  const auto not_before = reinterpret_cast<NotAfter>(sym("X509_get0_notBefore"));
  const auto cmp_now = reinterpret_cast<CmpNow>(sym("X509_cmp_current_time"));
  const auto clear_errors = reinterpret_cast<ClearErrors>(sym("ERR_clear_error"));
  if (!bio_new_file || !bio_free || !read_x509 || !read_key || !x509_free || !key_free ||
      !check_key || !not_after || !not_before || !cmp_now || !clear_errors) {
    *error = "the OpenSSL that libcoap loaded lacks the PEM functions (not OpenSSL 3?)";
    return false;
  }
  // Every certificate of a PEM file; nullptr when it cannot be opened.
  auto certificates = [&](const std::string& path, std::vector<X509*>* out) {
    Bio* bio = bio_new_file(path.c_str(), "r");
    if (!bio) return false;
    while (X509* x = read_x509(bio, nullptr, nullptr, nullptr)) out->push_back(x);
    bio_free(bio);
    return true;
  };
  auto free_all = [&](std::vector<X509*>& certs) {
    for (X509* x : certs) x509_free(x);
    certs.clear();
  };
  bool ok = true;
  std::vector<X509*> certs;
  if (!ca_file.empty()) {
    if (!certificates(ca_file, &certs) || certs.empty()) {
      *error =
          ca_file +
          " holds no PEM certificate (a CA file is a list of -----BEGIN CERTIFICATE----- blocks)";
      ok = false;
    }
    free_all(certs);
  }
  if (ok && !cert_file.empty()) {
    if (!certificates(cert_file, &certs) || certs.empty()) {
      *error = cert_file + " holds no PEM certificate";
      ok = false;
    } else if (cmp_now(not_after(certs.front())) < 0) {
      *error = "the client certificate " + cert_file + " has expired";
      ok = false;
    } else if (cmp_now(not_before(certs.front())) > 0) {
      *error = "the client certificate " + cert_file + " is not valid yet (or the clock is wrong)";
      ok = false;
    }
    if (ok && !key_file.empty()) {
      Bio* bio = bio_new_file(key_file.c_str(), "r");
      Key* key = bio ? read_key(bio, nullptr, nullptr, nullptr) : nullptr;
      if (bio) bio_free(bio);
      if (!key) {
        *error = key_file +
                 " holds no PEM private key (or it is encrypted: the agent cannot "
                 "ask for a passphrase)";
        ok = false;
      } else if (check_key(certs.front(), key) != 1) {
        *error = "the private key " + key_file + " does not belong to the certificate " + cert_file;
        ok = false;
      }
      if (key) key_free(key);
    }
    free_all(certs);
  }
  clear_errors();  // nothing of this must surface in a later handshake's reasons
  return ok;
}

const Libcoap& libcoap() { return g_loaded; }

}  // namespace tb::coap
