// Server faults for the serverfault suite (issue 14 item 2): answers that the path to ThingsBoard,
// or ThingsBoard under stress, can produce. Each is a control switch ("fault MODE [N]", see
// docs/test-server.md "Faults"); the request itself is processed as usual, only its answer is
// shaped. Kept apart from main.cpp, which holds what ThingsBoard does when all is well.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "wire.h"

namespace tbserver {

enum class FaultMode {
  kOff,
  kAckOnly,       // a CON request gets an empty ACK and never its answer
  kDuplicate,     // the answer is sent twice (a piggybacked one byte for byte, a CON one as a
                  // second CON with a new MID and the same token)
  kReorder,       // the answer is held back and sent after the next answer: late, out of order
  kWrongToken,    // the answer carries a token the client never used
  kTruncate,      // the answer's payload is cut in half (no payload: the datagram loses a byte)
  kOversize,      // the answer's payload is padded to a 4096-byte datagram (over any MTU)
  kBlock1Abort,   // a Block1 transfer is broken off: block 1 gets 4.08 Request Entity Incomplete
  kBlock1Refuse,  // a Block1 transfer is refused: block 0 gets 4.13 Request Entity Too Large
};

class Faults {
 public:
  // "fault MODE [N]": the next N answers (N = 0 or absent: every answer until "fault off").
  // Returns "ok" or "error …".
  std::string Control(const std::string& mode, const std::string& count);

  // For the final answer to a request: the fault that shapes it (counted down), or kOff. The
  // Block1 modes never apply here.
  FaultMode TakeForAnswer();
  // For a block of a Block1 transfer: the error code to answer instead (4.08 for block 1 and
  // later under kBlock1Abort, 4.13 for block 0 under kBlock1Refuse), counted down.
  std::optional<uint8_t> TakeForBlock1(const Block& block);

  static const char* Name(FaultMode m);
  // A token of the same length as `token` (at least one byte) that differs in every byte.
  static std::string OtherToken(const std::string& token);
  // Applies kTruncate / kOversize to an encoded answer.
  static std::string Shape(FaultMode m, Message msg);

  // kReorder: one answer waits here until the next answer has gone out.
  struct Held {
    std::string bytes;
    std::string peer_key;
  };
  std::optional<Held> held;

 private:
  bool Use(bool applies);
  FaultMode mode_ = FaultMode::kOff;
  int64_t left_ = 0;  // 0: unlimited while mode_ is on
};

}  // namespace tbserver
