#define TB_LIBCOAP_NO_REDIRECT
#include "coap/libcoap.hpp"

#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>

#include <sys/random.h>

#include <array>
#include <cstdint>
#include <ctime>
#include <vector>

#include "util/fs.hpp"

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

namespace {

// OpenSSL 3's opaque types, as the libcrypto functions below take them (openssl/*.h).
namespace ossl {
struct Bio;
struct BioMethod;
struct Integer;
struct Key;
struct Md;
struct Name;
struct Time;
struct X509;
}  // namespace ossl

// libcrypto's functions, looked up in the libraries libcoap's DTLS build loaded (dlsym on its
// handle searches them): the agent itself never links OpenSSL (libcoap.hpp says why). Each
// function is named once, with its C type; complete() says whether every one was found.
class Crypto {
 public:
  template <typename Fn>
  Fn get(const char* name) {
    void* p = dlsym(g_handle, name);
    if (!p && missing_.empty()) missing_ = name;
    return reinterpret_cast<Fn>(p);
  }
  bool complete() const { return missing_.empty(); }
  // "the OpenSSL that libcoap loaded lacks NAME (not OpenSSL 3?)"
  std::string lacks() const {
    return "the OpenSSL that libcoap loaded lacks " + missing_ + " (not OpenSSL 3?)";
  }

 private:
  std::string missing_;
};

}  // namespace

NameCheck certificate_names(const unsigned char* der, std::size_t length, const std::string& name) {
  if (!g_handle || !g_loaded.dtls) return NameCheck::Unavailable;
  using ossl::X509;
  // Looked up once: this runs for every handshake's certificate check.
  static Crypto crypto;
  static const auto d2i = crypto.get<X509* (*)(X509**, const unsigned char**, long)>("d2i_X509");
  static const auto x509_free = crypto.get<void (*)(X509*)>("X509_free");
  static const auto check_host =
      crypto.get<int (*)(X509*, const char*, std::size_t, unsigned, char**)>("X509_check_host");
  static const auto check_ip =
      crypto.get<int (*)(X509*, const char*, unsigned)>("X509_check_ip_asc");
  if (!crypto.complete() || length > (1u << 20)) return NameCheck::Unavailable;
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
  using ossl::Bio, ossl::Key, ossl::Time, ossl::X509;
  Crypto crypto;
  const auto bio_new_file = crypto.get<Bio* (*)(const char*, const char*)>("BIO_new_file");
  const auto bio_free = crypto.get<int (*)(Bio*)>("BIO_free");
  const auto read_x509 = crypto.get<X509* (*)(Bio*, X509**, void*, void*)>("PEM_read_bio_X509");
  const auto read_key = crypto.get<Key* (*)(Bio*, Key**, void*, void*)>("PEM_read_bio_PrivateKey");
  const auto x509_free = crypto.get<void (*)(X509*)>("X509_free");
  const auto key_free = crypto.get<void (*)(Key*)>("EVP_PKEY_free");
  const auto check_key = crypto.get<int (*)(const X509*, const Key*)>("X509_check_private_key");
  const auto not_after = crypto.get<const Time* (*)(const X509*)>("X509_get0_notAfter");
  const auto not_before = crypto.get<const Time* (*)(const X509*)>("X509_get0_notBefore");
  const auto cmp_now = crypto.get<int (*)(const Time*)>("X509_cmp_current_time");
  const auto clear_errors = crypto.get<void (*)()>("ERR_clear_error");
  if (!crypto.complete()) {
    *error = crypto.lacks();
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

bool generate_identity(const std::string& key_file, const std::string& cert_file,
                       const std::string& common_name, std::string* error) {
  if (!g_handle || !g_loaded.dtls) {
    *error = "libcoap's DTLS build is not loaded";
    return false;
  }
  using ossl::Bio, ossl::BioMethod, ossl::Integer, ossl::Key, ossl::Md, ossl::Name, ossl::Time,
      ossl::X509;
  Crypto crypto;
  const auto keygen =
      crypto.get<Key* (*)(void*, const char*, const char*, ...)>("EVP_PKEY_Q_keygen");
  const auto key_free = crypto.get<void (*)(Key*)>("EVP_PKEY_free");
  const auto x509_new = crypto.get<X509* (*)()>("X509_new");
  const auto x509_free = crypto.get<void (*)(X509*)>("X509_free");
  const auto set_version = crypto.get<int (*)(X509*, long)>("X509_set_version");
  const auto get_serial = crypto.get<Integer* (*)(X509*)>("X509_get_serialNumber");
  const auto integer_set = crypto.get<int (*)(Integer*, long)>("ASN1_INTEGER_set");
  const auto not_before = crypto.get<Time* (*)(const X509*)>("X509_getm_notBefore");
  const auto not_after = crypto.get<Time* (*)(const X509*)>("X509_getm_notAfter");
  const auto time_set = crypto.get<Time* (*)(Time*, std::time_t)>("ASN1_TIME_set");
  const auto time_set_string = crypto.get<int (*)(Time*, const char*)>("ASN1_TIME_set_string");
  const auto set_pubkey = crypto.get<int (*)(X509*, Key*)>("X509_set_pubkey");
  const auto subject = crypto.get<Name* (*)(const X509*)>("X509_get_subject_name");
  const auto add_entry =
      crypto.get<int (*)(Name*, const char*, int, const unsigned char*, int, int, int)>(
          "X509_NAME_add_entry_by_txt");
  const auto set_issuer = crypto.get<int (*)(X509*, const Name*)>("X509_set_issuer_name");
  const auto sha256 = crypto.get<const Md* (*)()>("EVP_sha256");
  const auto sign = crypto.get<int (*)(X509*, Key*, const Md*)>("X509_sign");
  const auto s_mem = crypto.get<const BioMethod* (*)()>("BIO_s_mem");
  const auto bio_new = crypto.get<Bio* (*)(const BioMethod*)>("BIO_new");
  const auto bio_free = crypto.get<int (*)(Bio*)>("BIO_free");
  const auto bio_ctrl = crypto.get<long (*)(Bio*, int, long, void*)>("BIO_ctrl");
  const auto write_key =
      crypto.get<int (*)(Bio*, const Key*, const void*, const unsigned char*, int, void*, void*)>(
          "PEM_write_bio_PrivateKey");
  const auto write_x509 = crypto.get<int (*)(Bio*, X509*)>("PEM_write_bio_X509");
  const auto clear_errors = crypto.get<void (*)()>("ERR_clear_error");
  if (!crypto.complete()) {
    *error = crypto.lacks();
    return false;
  }
  // The PEM text of whatever `write` puts in a memory BIO (BIO_get_mem_data is BIO_ctrl
  // BIO_CTRL_INFO, openssl/bio.h).
  const auto pem = [&](auto write) {
    std::string out;
    if (Bio* bio = bio_new(s_mem())) {
      if (write(bio) == 1) {
        char* data = nullptr;
        const long n = bio_ctrl(bio, /*BIO_CTRL_INFO*/ 3, 0, &data);
        if (n > 0 && data) out.assign(data, static_cast<std::size_t>(n));
      }
      bio_free(bio);
    }
    return out;
  };
  // P-256: what ThingsBoard's DTLS stack (Scandium) and every DTLS 1.2 ECDHE-ECDSA suite of
  // docs/thingsboard-coap.md §6.2 handle; small keys and signatures for small devices.
  Key* key = keygen(nullptr, nullptr, "EC", "P-256");
  X509* cert = key ? x509_new() : nullptr;
  std::uint64_t serial = 0;
  while (getrandom(&serial, sizeof serial, 0) != sizeof serial) {
  }
  const auto cn = reinterpret_cast<const unsigned char*>(common_name.c_str());
  bool ok = cert && set_version(cert, 2 /* X509_VERSION_3 */) == 1 &&
            integer_set(get_serial(cert), static_cast<long>((serial & 0x7fffffff) | 1)) == 1 &&
            // Valid since the epoch: a board without an RTC may generate it while its clock still
            // says 1970, and the server must not see it as "not yet valid" once the clock is set.
            time_set(not_before(cert), 0) != nullptr &&
            // Valid "forever" (RFC 5280 §4.1.2.5: 99991231235959Z means no well-defined
            // expiration): the device cannot renew a self-signed certificate registered as its
            // ThingsBoard credential over CoAP, and ThingsBoard refuses an expired one in the
            // handshake (§6.2), which would lock out an unattended device for good. Trust comes
            // from the server's registration of this exact certificate, not from its dates.
            time_set_string(not_after(cert), "99991231235959Z") == 1 &&
            set_pubkey(cert, key) == 1 &&
            add_entry(subject(cert), "CN", /*MBSTRING_UTF8*/ 0x1000, cn, -1, -1, 0) == 1 &&
            set_issuer(cert, subject(cert)) == 1 && sign(cert, key, sha256()) > 0;
  std::string key_pem, cert_pem;
  if (ok) {
    key_pem = pem([&](Bio* b) { return write_key(b, key, nullptr, nullptr, 0, nullptr, nullptr); });
    cert_pem = pem([&](Bio* b) { return write_x509(b, cert); });
    ok = !key_pem.empty() && !cert_pem.empty();
  }
  if (cert) x509_free(cert);
  if (key) key_free(key);
  clear_errors();
  if (!ok) {
    *error = "OpenSSL could not make an EC P-256 key and a self-signed certificate";
    return false;
  }
  // The key first: a certificate without its key is useless, a key without its certificate is
  // made again (both are) on the next start.
  std::string why;
  if (!write_file_atomic(key_file, key_pem, 0600, &why)) {
    *error = "cannot write " + key_file + ": " + why;
    return false;
  }
  if (!write_file_atomic(cert_file, cert_pem, 0644, &why)) {
    *error = "cannot write " + cert_file + ": " + why;
    return false;
  }
  return true;
}

const Libcoap& libcoap() { return g_loaded; }

}  // namespace tb::coap
