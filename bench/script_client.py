#!/usr/bin/env python3
"""Alternative (b) of the bench (issue 13): the shape of ThingsBoard's documented example, a
script sending one confirmable POST per reading and waiting for its answer before the next.
Python standard library only, a plain UDP socket and a hand-built CoAP message (RFC 7252 §3).

    script_client.py PORT TOKEN N      prints "requests N ok K seconds S requests/s R"

It handles every framing ThingsBoard uses (docs/thingsboard-coap.md §8): a piggybacked answer,
an empty ACK then a separate answer, and a CON answer with no ACK first (which it ACKs).
"""

import os
import socket
import struct
import sys
import time


def option(delta, value):
    """One option (RFC 7252 §3.1), deltas and lengths under 269."""
    def nib(n):
        return (n, b"") if n < 13 else (13, bytes([n - 13]))
    d, dx = nib(delta)
    ln, lx = nib(len(value))
    return bytes([(d << 4) | ln]) + dx + lx + value


def request(mid, token, path, payload):
    out = bytes([0x40 | len(token), 0x02]) + struct.pack("!H", mid) + token  # CON POST
    last = 0
    for seg in path:
        out += option(11 - last, seg.encode())  # Uri-Path
        last = 11
    return out + b"\xff" + payload


def main():
    port, token, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(5)
    mid = int.from_bytes(os.urandom(2), "big")
    ok = 0
    t0 = time.monotonic()
    for i in range(n):
        mid = (mid + 1) & 0xFFFF
        tok = os.urandom(4)
        body = b'[{"ts":%d,"values":{"v":%d.5}}]' % (1700000000000 + i, i % 1000)
        sock.send(request(mid, tok, ["api", "v1", token, "telemetry"], body))
        while True:
            data = sock.recv(2048)
            kind, tkl, code = (data[0] >> 4) & 3, data[0] & 0xF, data[1]
            rmid = data[2:4]
            if kind == 2 and code == 0:  # empty ACK: the answer comes separately
                continue
            if data[4:4 + tkl] != tok:
                continue
            if kind == 0:  # a CON answer: ACK it (RFC 7252 §5.2.2)
                sock.send(bytes([0x60, 0]) + rmid)
            if code == (2 << 5 | 1):
                ok += 1
            break
    s = time.monotonic() - t0
    print(f"requests {n} ok {ok} seconds {s:.3f} requests/s {n / s:.0f}")
    return 0 if ok == n else 1


if __name__ == "__main__":
    sys.exit(main())
