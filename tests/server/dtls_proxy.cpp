// tb-test-dtls-proxy: the DTLS side of the project's test server (docs/test-server.md, "DTLS").
//
// ThingsBoard terminates DTLS 1.2 in its CoAP transport (docs/thingsboard-coap.md §6.2) and
// handles the decrypted CoAP exactly as plain CoAP. tb-test-server has its own message layer on a
// plain UDP socket, so DTLS is put in front of it: this proxy accepts DTLS 1.2 sessions with the
// given server certificate (only AEAD ECDHE suites, as ThingsBoard's Scandium does), and relays
// each decrypted datagram to the plain server from a UDP socket of its own per client (so the
// server sees one peer per DTLS session), and the server's answers back through that session.
//
// Client authentication is WANTED, as in ThingsBoard (§6.2): a client certificate is asked for but
// not required, no CA trust is checked, and only an expired or not-yet-valid certificate aborts
// the handshake (fatal bad_certificate). After a handshake, the session's upstream socket first
// sends the plain server one identity datagram (tests/server/x509.h): 0x00, "tb-x509\n", then
// the client's leaf certificate as PEM, or nothing after the prefix when it presented none; the
// server looks the certificate up among its X.509 devices, as ThingsBoard does at handshake time.
//
// The classic OpenSSL DTLS server shape: DTLSv1_listen() with cookies on the listening socket,
// then a socket bound to the same address and connected to the client carries that session.
// One thread, poll(); a test tool, not production code.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace {

volatile sig_atomic_t g_stop = 0;

struct Address {
  sockaddr_storage ss{};
  socklen_t len = 0;
  bool operator<(const Address& o) const {
    if (len != o.len) return len < o.len;
    return std::memcmp(&ss, &o.ss, len) < 0;
  }
  std::string text() const {
    char host[INET6_ADDRSTRLEN] = "?";
    int port = 0;
    if (ss.ss_family == AF_INET) {
      const auto* a = reinterpret_cast<const sockaddr_in*>(&ss);
      inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
      port = ntohs(a->sin_port);
    } else if (ss.ss_family == AF_INET6) {
      const auto* a = reinterpret_cast<const sockaddr_in6*>(&ss);
      inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
      port = ntohs(a->sin6_port);
    }
    return std::string(host) + ":" + std::to_string(port);
  }
};

std::optional<Address> parse_address(const std::string& text) {
  const auto colon = text.rfind(':');
  if (colon == std::string::npos) return std::nullopt;
  std::string host = text.substr(0, colon);
  if (host.size() > 2 && host.front() == '[') host = host.substr(1, host.size() - 2);
  const int port = std::atoi(text.c_str() + colon + 1);
  Address a;
  auto* v4 = reinterpret_cast<sockaddr_in*>(&a.ss);
  auto* v6 = reinterpret_cast<sockaddr_in6*>(&a.ss);
  if (inet_pton(AF_INET, host.c_str(), &v4->sin_addr) == 1) {
    v4->sin_family = AF_INET;
    v4->sin_port = htons(static_cast<uint16_t>(port));
    a.len = sizeof(sockaddr_in);
  } else if (inet_pton(AF_INET6, host.c_str(), &v6->sin6_addr) == 1) {
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons(static_cast<uint16_t>(port));
    a.len = sizeof(sockaddr_in6);
  } else {
    return std::nullopt;
  }
  return a;
}

int udp_socket(const Address& bind_to, bool reuse) {
  const int fd = socket(bind_to.ss.ss_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  const int one = 1;
  if (reuse) {
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
  }
  if (bind(fd, reinterpret_cast<const sockaddr*>(&bind_to.ss), bind_to.len) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// Cookies (RFC 6347 §4.2.1) bound to the client's address with a per-run secret.
unsigned char g_cookie_secret[16];

void cookie_for(SSL* ssl, unsigned char* out, unsigned int* len) {
  Address peer;
  BIO_dgram_get_peer(SSL_get_rbio(ssl), &peer.ss);
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  HMAC(EVP_sha256(), g_cookie_secret, sizeof g_cookie_secret,
       reinterpret_cast<const unsigned char*>(&peer.ss), sizeof peer.ss, digest, &n);
  std::memcpy(out, digest, 16);
  *len = 16;
}

int generate_cookie(SSL* ssl, unsigned char* cookie, unsigned int* len) {
  cookie_for(ssl, cookie, len);
  return 1;
}

int verify_cookie(SSL* ssl, const unsigned char* cookie, unsigned int len) {
  unsigned char expected[16];
  unsigned int n = 0;
  cookie_for(ssl, expected, &n);
  return len == n && std::memcmp(cookie, expected, n) == 0;
}

// §6.2 "X.509 identity check": every certificate of the client chain must be within its validity
// period; nothing else is checked (no CA trust, as in ThingsBoard). Rejected with the error
// X509_V_ERR_CERT_REJECTED, which OpenSSL turns into a fatal bad_certificate alert (an expiry
// error would become certificate_expired, which Scandium does not send).
int verify_client(int /*preverify_ok*/, X509_STORE_CTX* store) {
  X509* cert = X509_STORE_CTX_get_current_cert(store);
  if (!cert) return 1;
  if (X509_cmp_current_time(X509_get0_notBefore(cert)) >= 0 ||
      X509_cmp_current_time(X509_get0_notAfter(cert)) <= 0) {
    X509_STORE_CTX_set_error(store, X509_V_ERR_CERT_REJECTED);
    return 0;
  }
  return 1;
}

// The identity datagram for the server (tests/server/x509.h): the prefix, then the leaf as PEM.
std::string identity_datagram(SSL* ssl) {
  std::string out("\0tb-x509\n", 9);
  X509* leaf = SSL_get1_peer_certificate(ssl);
  if (!leaf) return out;
  BIO* mem = BIO_new(BIO_s_mem());
  if (mem && PEM_write_bio_X509(mem, leaf) == 1) {
    char* data = nullptr;
    const long n = BIO_get_mem_data(mem, &data);
    if (n > 0) out.append(data, static_cast<size_t>(n));
  }
  BIO_free(mem);
  X509_free(leaf);
  return out;
}

struct Session {
  Address client;
  int client_fd = -1;    // bound to the listening address, connected to the client
  int upstream_fd = -1;  // connected to the plain server
  SSL* ssl = nullptr;
  bool established = false;
  ~Session() {
    if (ssl) SSL_free(ssl);
    if (client_fd >= 0) close(client_fd);
    if (upstream_fd >= 0) close(upstream_fd);
  }
};

struct Proxy {
  Address listen_at, upstream;
  SSL_CTX* ctx = nullptr;
  int listen_fd = -1;
  SSL* listening = nullptr;  // the SSL DTLSv1_listen() works on; handed to the session it accepts
  std::map<Address, std::unique_ptr<Session>> sessions;
  bool quiet = false;

  void log(const std::string& line) const {
    if (!quiet) std::fprintf(stderr, "tb-test-dtls-proxy: %s\n", line.c_str());
  }

  static std::string ssl_errors() {
    std::string out;
    while (unsigned long e = ERR_get_error()) {
      char buf[256];
      ERR_error_string_n(e, buf, sizeof buf);
      out += (out.empty() ? "" : "; ") + std::string(buf);
    }
    return out;
  }

  bool new_listening_ssl() {
    listening = SSL_new(ctx);
    if (!listening) return false;
    BIO* bio = BIO_new_dgram(listen_fd, BIO_NOCLOSE);
    SSL_set_bio(listening, bio, bio);
    SSL_set_options(listening, SSL_OP_COOKIE_EXCHANGE);
    return true;
  }

  // A ClientHello (with a valid cookie) on the listening socket: a new session.
  void accept_new() {
    BIO_ADDR* peer = BIO_ADDR_new();
    const int r = DTLSv1_listen(listening, peer);
    if (r <= 0) {
      BIO_ADDR_free(peer);
      ERR_clear_error();
      return;  // a HelloVerifyRequest was sent, or the datagram was not a ClientHello
    }
    auto s = std::make_unique<Session>();
    BIO_dgram_get_peer(SSL_get_rbio(listening), &s->client.ss);
    s->client.len = s->client.ss.ss_family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in);
    BIO_ADDR_free(peer);
    s->client_fd = udp_socket(listen_at, true);
    Address any;
    any.ss.ss_family = upstream.ss.ss_family;
    any.len = upstream.len;
    s->upstream_fd = udp_socket(any, false);
    if (s->client_fd < 0 || s->upstream_fd < 0 ||
        connect(s->client_fd, reinterpret_cast<const sockaddr*>(&s->client.ss), s->client.len) ||
        connect(s->upstream_fd, reinterpret_cast<const sockaddr*>(&upstream.ss), upstream.len)) {
      log("cannot set up sockets for " + s->client.text() + ": " + std::strerror(errno));
      SSL_free(listening);
      new_listening_ssl();
      return;
    }
    s->ssl = listening;
    BIO_set_fd(SSL_get_rbio(s->ssl), s->client_fd, BIO_NOCLOSE);
    BIO_ctrl(SSL_get_rbio(s->ssl), BIO_CTRL_DGRAM_SET_CONNECTED, 0, &s->client.ss);
    new_listening_ssl();
    log("handshake from " + s->client.text());
    Session* raw = s.get();
    sessions[s->client] = std::move(s);
    drive(*raw);
  }

  // Continues the handshake or relays application data; false when the session is over.
  bool drive(Session& s) {
    if (!s.established) {
      const int r = SSL_accept(s.ssl);
      if (r == 1) {
        s.established = true;
        // Before anything is relayed: who the client is (a certificate, or none).
        const std::string identity = identity_datagram(s.ssl);
        const bool with_cert = identity.size() > 9;
        send(s.upstream_fd, identity.data(), identity.size(), 0);
        log("session with " + s.client.text() + " established (" + SSL_get_cipher(s.ssl) +
            (with_cert ? ", client certificate)" : ", no client certificate)"));
      } else {
        const int e = SSL_get_error(s.ssl, r);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return true;
        log("handshake with " + s.client.text() + " failed: " + ssl_errors());
        return false;
      }
    }
    unsigned char buf[4096];
    for (;;) {
      const int n = SSL_read(s.ssl, buf, sizeof buf);
      if (n > 0) {
        send(s.upstream_fd, buf, static_cast<size_t>(n), 0);
        continue;
      }
      const int e = SSL_get_error(s.ssl, n);
      if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return true;
      log("session with " + s.client.text() + " ended" +
          (e == SSL_ERROR_ZERO_RETURN ? std::string(" (close_notify)") : ": " + ssl_errors()));
      return false;
    }
  }

  void from_upstream(Session& s) {
    unsigned char buf[4096];
    for (;;) {
      const ssize_t n = recv(s.upstream_fd, buf, sizeof buf, 0);
      if (n <= 0) return;
      if (s.established) SSL_write(s.ssl, buf, static_cast<int>(n));
    }
  }

  int run() {
    while (!g_stop) {
      std::vector<pollfd> fds{{listen_fd, POLLIN, 0}};
      std::vector<Session*> order;
      for (auto& [addr, s] : sessions) {
        fds.push_back({s->client_fd, POLLIN, 0});
        fds.push_back({s->upstream_fd, POLLIN, 0});
        order.push_back(s.get());
      }
      // Handshake retransmissions (DTLSv1_handle_timeout) need a tick; 100 ms is plenty here.
      if (poll(fds.data(), fds.size(), 100) < 0 && errno != EINTR) return 1;
      if (fds[0].revents & POLLIN) accept_new();
      std::vector<Address> ended;
      for (std::size_t i = 0; i < order.size(); ++i) {
        Session& s = *order[i];
        bool alive = true;
        if (fds[1 + 2 * i].revents & POLLIN) alive = drive(s);
        if (alive && (fds[2 + 2 * i].revents & POLLIN)) from_upstream(s);
        if (alive && !s.established && DTLSv1_handle_timeout(s.ssl) < 0) alive = false;
        if (!alive) ended.push_back(s.client);
      }
      for (const auto& a : ended) sessions.erase(a);
    }
    return 0;
  }
};

void usage() {
  std::fprintf(stderr,
               "usage: tb-test-dtls-proxy --listen ADDR:PORT --upstream ADDR:PORT --cert PEM "
               "--key PEM [--quiet]\n");
}

}  // namespace

int main(int argc, char** argv) {
  Proxy p;
  std::string cert, key;
  std::optional<Address> listen_at, upstream;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : nullptr;
    if (a == "--quiet") {
      p.quiet = true;
      continue;
    }
    if (!v) return usage(), 2;
    ++i;
    if (a == "--listen")
      listen_at = parse_address(v);
    else if (a == "--upstream")
      upstream = parse_address(v);
    else if (a == "--cert")
      cert = v;
    else if (a == "--key")
      key = v;
    else
      return usage(), 2;
  }
  if (!listen_at || !upstream || cert.empty() || key.empty()) return usage(), 2;
  p.listen_at = *listen_at;
  p.upstream = *upstream;
  signal(SIGPIPE, SIG_IGN);
  struct sigaction sa {};
  sa.sa_handler = [](int) { g_stop = 1; };
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);

  RAND_bytes(g_cookie_secret, sizeof g_cookie_secret);
  p.ctx = SSL_CTX_new(DTLS_server_method());
  // DTLS 1.2 only, ECDHE with AEAD ciphers only (docs/thingsboard-coap.md §6.2).
  SSL_CTX_set_min_proto_version(p.ctx, DTLS1_2_VERSION);
  SSL_CTX_set_max_proto_version(p.ctx, DTLS1_2_VERSION);
  SSL_CTX_set_cipher_list(p.ctx,
                          "ECDHE-ECDSA-AES128-CCM8:ECDHE-ECDSA-AES256-CCM8:ECDHE-ECDSA-AES128-CCM:"
                          "ECDHE-ECDSA-AES256-CCM:ECDHE-ECDSA-AES128-GCM-SHA256:"
                          "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256:"
                          "ECDHE-RSA-AES256-GCM-SHA384");
  SSL_CTX_set_cookie_generate_cb(p.ctx, generate_cookie);
  SSL_CTX_set_cookie_verify_cb(p.ctx, verify_cookie);
  SSL_CTX_set_read_ahead(p.ctx, 1);
  // Client authentication WANTED (§6.2): ask for a certificate, accept a handshake without one.
  SSL_CTX_set_verify(p.ctx, SSL_VERIFY_PEER, verify_client);
  static const unsigned char kSessionContext[] = "tb-test-dtls-proxy";
  SSL_CTX_set_session_id_context(p.ctx, kSessionContext, sizeof kSessionContext - 1);
  if (SSL_CTX_use_certificate_chain_file(p.ctx, cert.c_str()) != 1 ||
      SSL_CTX_use_PrivateKey_file(p.ctx, key.c_str(), SSL_FILETYPE_PEM) != 1 ||
      SSL_CTX_check_private_key(p.ctx) != 1) {
    std::fprintf(stderr, "tb-test-dtls-proxy: cannot use %s / %s: %s\n", cert.c_str(), key.c_str(),
                 Proxy::ssl_errors().c_str());
    return 1;
  }
  p.listen_fd = udp_socket(p.listen_at, true);
  if (p.listen_fd < 0 || !p.new_listening_ssl()) {
    std::fprintf(stderr, "tb-test-dtls-proxy: cannot listen on %s: %s\n",
                 p.listen_at.text().c_str(), std::strerror(errno));
    return 1;
  }
  // Port 0: the kernel's choice, which the sessions' sockets must bind to as well.
  p.listen_at.len = sizeof p.listen_at.ss;
  getsockname(p.listen_fd, reinterpret_cast<sockaddr*>(&p.listen_at.ss), &p.listen_at.len);
  std::printf("listening %s\n", p.listen_at.text().c_str());
  std::fflush(stdout);
  return p.run();
}
