// libcoap, loaded at run time. Private to coap/ (the only module that includes libcoap).
//
// Why: libcoap comes in builds per TLS library, and the OpenSSL one loads and initialises
// libssl/libcrypto at start-up (about 4 MiB resident) even when no DTLS session is ever made.
// Most devices speak plain coap, so the agent links no libcoap at all: the first Client loads the
// plain build (libcoap-3-notls) for coap and the OpenSSL build for coaps (server.dtls), one
// binary for both (systemd dlopen()s its optional libraries on demand the same way). Both builds
// share one API and one set of headers.
//
// The functions coap/ may call are listed once, in libcoap_functions.txt. CMake generates from
// it the table below and a header that redirects every call `coap_x(...)` to the loaded table,
// so the code reads as plain libcoap calls. A call to a function missing from the list fails to
// link (nothing provides the symbol).
#pragma once

#include <cstddef>
#include <string>

#include <coap3/coap.h>

namespace tb::coap {

struct Libcoap {
#define X(name) decltype(&::name) name = nullptr;
#include "coap/libcoap_table.inc"
#undef X
  bool dtls = false;   // the build can do DTLS (coaps)
  std::string soname;  // what was loaded, for messages
};

// Loads libcoap once per process: the plain build unless `need_dtls`, falling back to the DTLS
// build when the plain one is not installed (some distributions ship only that). A process keeps
// the build it loaded first: asking for DTLS after the plain build was loaded fails with a
// sentence (the agent reports that switching to coaps needs a restart). A libcoap that is
// already part of the process (a test program linked against one) is used as it is: two builds
// in one process would resolve each other's symbols. Never throws.
const Libcoap* load_libcoap(bool need_dtls, std::string* error);

// Whether an X.509 certificate (DER) is for `name` (a DNS name or an IP address), by the rules
// of OpenSSL's X509_check_host / X509_check_ip_asc (RFC 6125). Only with the DTLS build loaded:
// its libcrypto does the work. Unavailable when it cannot tell (no DTLS build, unparsable DER).
enum class NameCheck { Match, Mismatch, Unavailable };
NameCheck certificate_names(const unsigned char* der, std::size_t length, const std::string& name);

// Whether the DTLS files can be used: the CA file holds at least one certificate, the client
// certificate parses, is within its validity period and matches the private key. With OpenSSL's
// PEM readers, from the libcrypto the DTLS build loads (load_libcoap(true) first). *error names
// the file and the problem.
bool check_pem_files(const std::string& ca_file, const std::string& cert_file,
                     const std::string& key_file, std::string* error);

// Makes an EC P-256 private key (key_file, 0600) and a self-signed certificate for it with
// CN = common_name (cert_file), both PEM, each written atomically. With libcrypto from the DTLS
// build (load_libcoap(true) first). *error says what failed.
bool generate_identity(const std::string& key_file, const std::string& cert_file,
                       const std::string& common_name, std::string* error);

// The loaded library. Only valid after load_libcoap() succeeded (Client::create() does that
// before anything else).
const Libcoap& libcoap();

}  // namespace tb::coap

#ifndef TB_LIBCOAP_NO_REDIRECT
#include "coap/libcoap_redirect.h"
#endif
