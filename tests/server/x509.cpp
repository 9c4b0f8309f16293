// X.509 device identities of the test server: see x509.h.
#include "x509.h"

#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <algorithm>
#include <cstring>

namespace tbserver {

std::optional<std::string_view> IdentityPem(const uint8_t* data, size_t n) {
  if (n < kIdentityPrefix.size() ||
      std::memcmp(data, kIdentityPrefix.data(), kIdentityPrefix.size()) != 0)
    return std::nullopt;
  return std::string_view(reinterpret_cast<const char*>(data) + kIdentityPrefix.size(),
                          n - kIdentityPrefix.size());
}

std::optional<std::string> CertDerFromPem(std::string_view pem) {
  if (pem.empty() || pem.size() > (1u << 20)) return std::nullopt;
  BIO* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
  if (!bio) return std::nullopt;
  X509* cert = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr);
  BIO_free(bio);
  if (!cert) return std::nullopt;
  std::optional<std::string> out;
  unsigned char* der = nullptr;
  const int len = i2d_X509(cert, &der);
  if (len > 0) out = std::string(reinterpret_cast<const char*>(der), static_cast<size_t>(len));
  OPENSSL_free(der);
  X509_free(cert);
  return out;
}

std::string CertFingerprint(const std::string& der) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  if (EVP_Digest(der.data(), der.size(), md, &n, EVP_sha256(), nullptr) != 1) return "?";
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < std::min(n, 8u); ++i) {
    out.push_back(hex[md[i] >> 4]);
    out.push_back(hex[md[i] & 15]);
  }
  return out;
}

void X509Identities::Set(const std::string& peer, std::string device, std::string der) {
  if (by_peer_.size() >= kMaxEntries && !by_peer_.count(peer)) {
    auto oldest = std::min_element(
        by_peer_.begin(), by_peer_.end(),
        [](const auto& a, const auto& b) { return a.second.order < b.second.order; });
    by_peer_.erase(oldest);
  }
  by_peer_[peer] = Entry{std::move(device), std::move(der), next_order_++};
}

void X509Identities::ForgetDevice(const std::string& device) {
  for (auto it = by_peer_.begin(); it != by_peer_.end();)
    it = it->second.device == device ? by_peer_.erase(it) : std::next(it);
}

const X509Identities::Entry* X509Identities::Find(const std::string& peer) const {
  auto it = by_peer_.find(peer);
  return it == by_peer_.end() ? nullptr : &it->second;
}

}  // namespace tbserver
