// X.509 device identities of the test server (docs/test-server.md "DTLS"; docs/thingsboard-coap.md
// §0 "How the device is identified", §6.2 "X.509 identity check").
//
// ThingsBoard checks a DTLS client certificate during the handshake: it looks the leaf up among
// the devices' X509_CERTIFICATE credentials and caches the match under the client's address.
// tb-test-server never sees the handshake (tb-test-dtls-proxy terminates DTLS), so the proxy
// tells it, from the session's upstream socket and before anything else, with one identity
// datagram: 0x00 (CoAP version 0: never a valid CoAP message), "tb-x509\n", the leaf as PEM.
// An identity datagram with no PEM after the prefix says "this session has no certificate".
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>

namespace tbserver {

// The prefix of an identity datagram (the contract between tb-test-dtls-proxy and the server).
inline constexpr std::string_view kIdentityPrefix{"\0tb-x509\n", 9};

// The PEM part of an identity datagram, or nullopt if the datagram is not one.
std::optional<std::string_view> IdentityPem(const uint8_t* data, size_t n);

// The DER of the first certificate in a PEM text, or nullopt if there is none that parses.
// Never throws; the input is bounded by the caller (datagram or provisioning body).
std::optional<std::string> CertDerFromPem(std::string_view pem);

// A short fingerprint for log lines: the first 8 bytes of the DER's SHA-256, hex.
std::string CertFingerprint(const std::string& der);

// Identities cached per peer ("ip:port"), as ThingsBoard caches them per client address after
// the handshake. The device and the DER it matched are kept: a request uses the identity only
// while that device still has that certificate (revoke-x509, delete).
class X509Identities {
 public:
  struct Entry {
    std::string device;
    std::string der;
    uint64_t order = 0;
  };

  void Set(const std::string& peer, std::string device, std::string der);
  void Forget(const std::string& peer) { by_peer_.erase(peer); }
  void ForgetAll() { by_peer_.clear(); }
  void ForgetDevice(const std::string& device);
  const Entry* Find(const std::string& peer) const;
  size_t size() const { return by_peer_.size(); }

 private:
  // Bounded: one entry per DTLS session through the proxy; the oldest goes first.
  static constexpr size_t kMaxEntries = 4096;
  std::map<std::string, Entry> by_peer_;
  uint64_t next_order_ = 0;
};

}  // namespace tbserver
