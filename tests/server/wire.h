// CoAP (RFC 7252) message codec for tb-test-server.
// Decoding goes through libcoap 4.3.1's coap_pdu_parse() so that what we accept as a well-formed
// message is what a real libcoap stack accepts; encoding is done here because libcoap 4.3.1 has
// no public API that hands back the bytes of a PDU it built.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace tbserver {

enum class MsgType : uint8_t { kCon = 0, kNon = 1, kAck = 2, kRst = 3 };

// Option numbers we care about (RFC 7252 §5.10, RFC 7641, RFC 7959).
inline constexpr uint16_t kOptObserve = 6;
inline constexpr uint16_t kOptUriPath = 11;
inline constexpr uint16_t kOptContentFormat = 12;
inline constexpr uint16_t kOptUriQuery = 15;
inline constexpr uint16_t kOptBlock2 = 23;
inline constexpr uint16_t kOptBlock1 = 27;
inline constexpr uint16_t kOptSize2 = 28;
inline constexpr uint16_t kOptSize1 = 60;

constexpr uint8_t Code(int cls, int detail) { return static_cast<uint8_t>((cls << 5) | detail); }
std::string CodeString(uint8_t code);                  // 0x41 -> "2.01"
std::optional<uint8_t> ParseCode(const std::string&);  // "5.00" -> 0xA0

struct Option {
  uint16_t number = 0;
  std::string value;
};

struct Message {
  MsgType type = MsgType::kCon;
  uint8_t code = 0;
  uint16_t mid = 0;
  std::string token;
  std::vector<Option> options;  // sorted by number when encoding
  std::string payload;

  std::vector<std::string> All(uint16_t number) const;
  std::optional<std::string> First(uint16_t number) const;
  std::optional<uint32_t> Uint(uint16_t number) const;
  void AddUint(uint16_t number, uint32_t value);
};

// Returns nullopt when libcoap rejects the datagram as malformed.
std::optional<Message> Decode(const uint8_t* data, size_t len);
std::string Encode(const Message& m);

// Block option value (RFC 7959 §2.2).
struct Block {
  uint32_t num = 0;
  bool more = false;
  uint8_t szx = 0;
  size_t Size() const { return size_t{1} << (szx + 4); }
  uint32_t Encode() const { return (num << 4) | (more ? 0x8u : 0u) | szx; }
  static Block FromUint(uint32_t v) {
    return Block{v >> 4, (v & 0x8u) != 0, static_cast<uint8_t>(v & 0x7u)};
  }
};

}  // namespace tbserver
