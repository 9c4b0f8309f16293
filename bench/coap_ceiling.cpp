// The ceiling a sequential CoAP client can reach against a sink (issue 13, alternative (d)): a
// minimal libcoap client sending N confirmable POSTs back to back, each as soon as the previous
// one is answered (NSTART 1, RFC 7252 §4.7), each carrying one reading. Nothing else: no queue,
// no batching, no event loop but libcoap's own. A comparator for the bench, not part of the agent
// (which reaches libcoap only through src/coap/).
//
//   tb-bench-coap-ceiling PORT TOKEN N     prints "requests N seconds S requests/s R"
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include <coap3/coap.h>

namespace {

bool answered = false;
int last_code = 0;

coap_response_t on_response(coap_session_t*, const coap_pdu_t*, const coap_pdu_t* received,
                            const coap_mid_t) {
  const coap_pdu_code_t code = coap_pdu_get_code(received);
  last_code = (code >> 5) * 100 + (code & 0x1f);
  answered = true;
  return COAP_RESPONSE_OK;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s PORT TOKEN N\n", argv[0]);
    return 2;
  }
  const int port = std::atoi(argv[1]);
  const std::string token = argv[2];
  const long n = std::atol(argv[3]);
  coap_startup();
  coap_set_log_level(LOG_ERR);
  coap_context_t* ctx = coap_new_context(nullptr);
  coap_address_t dst;
  coap_address_init(&dst);
  dst.size = sizeof(sockaddr_in);
  dst.addr.sin.sin_family = AF_INET;
  dst.addr.sin.sin_port = htons(static_cast<uint16_t>(port));
  dst.addr.sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  coap_session_t* session = coap_new_client_session(ctx, nullptr, &dst, COAP_PROTO_UDP);
  if (!ctx || !session) return 1;
  coap_register_response_handler(ctx, on_response);
  const char* segs[] = {"api", "v1", token.c_str(), "telemetry"};
  const auto t0 = std::chrono::steady_clock::now();
  long ok = 0;
  for (long i = 0; i < n; ++i) {
    coap_pdu_t* pdu = coap_new_pdu(COAP_MESSAGE_CON, COAP_REQUEST_CODE_POST, session);
    uint8_t tok[8];
    size_t tlen = 0;
    coap_session_new_token(session, &tlen, tok);
    coap_add_token(pdu, tlen, tok);
    for (const char* s : segs)
      coap_add_option(pdu, COAP_OPTION_URI_PATH, std::strlen(s),
                      reinterpret_cast<const uint8_t*>(s));
    char body[96];
    const int len = std::snprintf(body, sizeof body, R"([{"ts":%lld,"values":{"v":%ld.5}}])",
                                  1700000000000LL + i, i % 1000);
    coap_add_data(pdu, static_cast<size_t>(len), reinterpret_cast<const uint8_t*>(body));
    answered = false;
    if (coap_send(session, pdu) == COAP_INVALID_MID) return 1;
    while (!answered) coap_io_process(ctx, 1000);
    if (last_code == 201) ++ok;
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("requests %ld ok %ld seconds %.3f requests/s %.0f\n", n, ok, s,
              static_cast<double>(n) / s);
  coap_session_release(session);
  coap_free_context(ctx);
  coap_cleanup();
  return ok == n ? 0 : 1;
}
