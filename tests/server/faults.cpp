#include "faults.h"

#include <algorithm>
#include <charconv>
#include <map>

namespace tbserver {

namespace {

const std::map<std::string, FaultMode>& Modes() {
  static const std::map<std::string, FaultMode> modes = {
      {"off", FaultMode::kOff},
      {"ack-only", FaultMode::kAckOnly},
      {"duplicate", FaultMode::kDuplicate},
      {"reorder", FaultMode::kReorder},
      {"wrong-token", FaultMode::kWrongToken},
      {"truncate", FaultMode::kTruncate},
      {"oversize", FaultMode::kOversize},
      {"block1-abort", FaultMode::kBlock1Abort},
      {"block1-refuse", FaultMode::kBlock1Refuse},
  };
  return modes;
}

constexpr size_t kOversizeDatagram = 4096;  // over the 1152-byte PDU libcoap expects, over MTUs

}  // namespace

const char* Faults::Name(FaultMode m) {
  for (const auto& [name, mode] : Modes())
    if (mode == m) return name.c_str();
  return "off";
}

std::string Faults::Control(const std::string& mode, const std::string& count) {
  auto m = Modes().find(mode);
  int64_t n = 0;
  if (!count.empty()) {
    auto [p, ec] = std::from_chars(count.data(), count.data() + count.size(), n);
    if (ec != std::errc() || p != count.data() + count.size() || n < 0) m = Modes().end();
  }
  if (m == Modes().end())
    return "error usage: fault off|ack-only|duplicate|reorder|wrong-token|truncate|oversize|"
           "block1-abort|block1-refuse [N]";
  mode_ = m->second;
  left_ = n;
  return "ok";
}

bool Faults::Use(bool applies) {
  if (!applies) return false;
  if (left_ > 0 && --left_ == 0) mode_ = FaultMode::kOff;
  return true;
}

FaultMode Faults::TakeForAnswer() {
  const FaultMode m = mode_;
  const bool answer_mode =
      m != FaultMode::kOff && m != FaultMode::kBlock1Abort && m != FaultMode::kBlock1Refuse;
  return Use(answer_mode) ? m : FaultMode::kOff;
}

std::optional<uint8_t> Faults::TakeForBlock1(const Block& block) {
  if (Use(mode_ == FaultMode::kBlock1Abort && block.num >= 1)) return Code(4, 8);
  if (Use(mode_ == FaultMode::kBlock1Refuse && block.num == 0)) return Code(4, 13);
  return std::nullopt;
}

std::string Faults::OtherToken(const std::string& token) {
  std::string t = token.empty() ? std::string(1, '\0') : token;
  for (auto& c : t) c = static_cast<char>(c ^ 0x5a);
  return t;
}

std::string Faults::Shape(FaultMode m, Message msg) {
  if (m == FaultMode::kTruncate) {
    if (msg.payload.empty()) {
      std::string bytes = Encode(msg);
      bytes.pop_back();  // an option or the token cut short: malformed
      return bytes;
    }
    msg.payload.resize(msg.payload.size() / 2);
  } else if (m == FaultMode::kOversize) {
    const size_t now = Encode(msg).size() + (msg.payload.empty() ? 1 : 0);  // +1: the 0xFF marker
    msg.payload.append(kOversizeDatagram > now ? kOversizeDatagram - now : 0, ' ');
  }
  return Encode(msg);
}

}  // namespace tbserver
