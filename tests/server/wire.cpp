#include "wire.h"

#include <coap3/coap.h>

#include <algorithm>
#include <cstdio>

namespace tbserver {

std::string CodeString(uint8_t code) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "%u.%02u", static_cast<unsigned>(code >> 5),
                static_cast<unsigned>(code & 0x1f));
  return buf;
}

std::optional<uint8_t> ParseCode(const std::string& s) {
  unsigned cls = 0, detail = 0;
  char tail = 0;
  // Only response classes 2..5 make sense as an answer to force ("fail N CODE").
  if (std::sscanf(s.c_str(), "%u.%2u%c", &cls, &detail, &tail) != 2 || cls < 2 || cls > 5 ||
      detail > 31)
    return std::nullopt;
  return Code(static_cast<int>(cls), static_cast<int>(detail));
}

std::vector<std::string> Message::All(uint16_t number) const {
  std::vector<std::string> out;
  for (const auto& o : options)
    if (o.number == number) out.push_back(o.value);
  return out;
}

std::optional<std::string> Message::First(uint16_t number) const {
  for (const auto& o : options)
    if (o.number == number) return o.value;
  return std::nullopt;
}

std::optional<uint32_t> Message::Uint(uint16_t number) const {
  auto v = First(number);
  if (!v) return std::nullopt;
  if (v->size() > 4) return std::nullopt;
  uint32_t r = 0;
  for (unsigned char c : *v) r = (r << 8) | c;
  return r;
}

void Message::AddUint(uint16_t number, uint32_t value) {
  std::string v;
  while (value) {
    v.insert(v.begin(), static_cast<char>(value & 0xff));
    value >>= 8;
  }
  options.push_back({number, v});
}

std::optional<Message> Decode(const uint8_t* data, size_t len) {
  if (len < 4) return std::nullopt;
  coap_pdu_t* pdu = coap_pdu_init(COAP_MESSAGE_CON, COAP_EMPTY_CODE, 0, len);
  if (!pdu) return std::nullopt;
  std::optional<Message> out;
  if (coap_pdu_parse(COAP_PROTO_UDP, data, len, pdu)) {
    Message m;
    m.type = static_cast<MsgType>(coap_pdu_get_type(pdu));
    m.code = static_cast<uint8_t>(coap_pdu_get_code(pdu));
    m.mid = static_cast<uint16_t>(coap_pdu_get_mid(pdu));
    coap_bin_const_t tok = coap_pdu_get_token(pdu);
    m.token.assign(reinterpret_cast<const char*>(tok.s), tok.length);
    coap_opt_iterator_t it;
    coap_option_iterator_init(pdu, &it, COAP_OPT_ALL);
    while (coap_opt_t* opt = coap_option_next(&it)) {
      m.options.push_back(
          {it.number,
           std::string(reinterpret_cast<const char*>(coap_opt_value(opt)), coap_opt_length(opt))});
    }
    size_t plen = 0;
    const uint8_t* p = nullptr;
    if (coap_get_data(pdu, &plen, &p) && p)
      m.payload.assign(reinterpret_cast<const char*>(p), plen);
    out = std::move(m);
  }
  coap_delete_pdu(pdu);
  return out;
}

namespace {
// Option delta/length nibble with its extension bytes (RFC 7252 §3.1).
void Nibble(uint32_t v, uint8_t& nib, std::string& ext) {
  if (v < 13) {
    nib = static_cast<uint8_t>(v);
  } else if (v < 269) {
    nib = 13;
    ext.push_back(static_cast<char>(v - 13));
  } else {
    nib = 14;
    ext.push_back(static_cast<char>((v - 269) >> 8));
    ext.push_back(static_cast<char>((v - 269) & 0xff));
  }
}
}  // namespace

std::string Encode(const Message& m) {
  std::string out;
  out.push_back(static_cast<char>(0x40 | (static_cast<uint8_t>(m.type) << 4) |
                                  static_cast<uint8_t>(m.token.size())));
  out.push_back(static_cast<char>(m.code));
  out.push_back(static_cast<char>(m.mid >> 8));
  out.push_back(static_cast<char>(m.mid & 0xff));
  out += m.token;
  std::vector<Option> opts = m.options;
  std::stable_sort(opts.begin(), opts.end(),
                   [](const Option& a, const Option& b) { return a.number < b.number; });
  uint16_t last = 0;
  for (const auto& o : opts) {
    uint8_t dn = 0, ln = 0;
    std::string dext, lext;
    Nibble(o.number - last, dn, dext);
    Nibble(static_cast<uint32_t>(o.value.size()), ln, lext);
    out.push_back(static_cast<char>((dn << 4) | ln));
    out += dext;
    out += lext;
    out += o.value;
    last = o.number;
  }
  if (!m.payload.empty()) {
    out.push_back(static_cast<char>(0xff));
    out += m.payload;
  }
  return out;
}

}  // namespace tbserver
