#!/usr/bin/env python3
"""A UDP proxy that impairs the link, standing in for netem (which the test kernel lacks).

    udp_proxy.py --listen 10.0.0.1:5683 --upstream 10.0.1.2:5683 \
        --loss 30 --delay 200 --jitter 100 --reorder 10 --duplicate 5 --seed 1 \
        --control /tmp/proxy.sock

Every client address gets its own upstream socket (like a NAT), so the upstream server sees one
peer per client and answers go back to the client that asked. Each direction ("up": client ->
upstream, "down": upstream -> client) has its own impairments: --up-loss, --down-delay, ...
override the common --loss, --delay, ... for one direction.

Per datagram, in this order: dropped while the link is down (also when the link goes down
while it is in flight); lost with probability loss %; delayed by delay ± jitter ms (uniform,
never below 0), so jitter alone reorders; with probability reorder % held back a further
--reorder-gap ms so that later datagrams overtake it; and with probability duplicate % sent a
second time (independently delayed).

Run-time control, without restarting (the proxy keeps its sockets and clients):
  SIGUSR1 link down (both directions drop everything), SIGUSR2 link up;
  --control PATH: a Unix stream socket taking one command per line, answering one line:
    down [up|down]      the link down (both directions, or one)
    up                  the link up again (both directions)
    set DIR KEY VALUE   DIR up|down|both, KEY loss|delay|jitter|reorder|reorder-gap|duplicate
    upstream HOST:PORT  new clients (and existing ones, re-connected) go there
    rebind              every client's upstream socket is replaced by a new one (a new source
                        port), as when a NAT rebinds; answers still on their way to the old one
                        are lost
    stats               the counters as one JSON line
  A path is used (not an abstract name) so a test in another network namespace can reach it.

The first line on stdout is "listening on HOST:PORT" (the bound port when --listen says 0).
On SIGTERM or SIGINT the counters are printed to stdout as one JSON line and the proxy exits 0.
Standard library only; one thread, asyncio, no polling.
"""

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import sys
import time

PARAM_KEYS = ("loss", "delay", "jitter", "reorder", "reorder-gap", "duplicate")
COUNTERS = ("received", "forwarded", "lost", "dropped_down", "duplicated", "reordered",
            "send_errors")


def parse_addr(text):
    host, sep, port = text.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: want HOST:PORT")
    host = host.strip("[]")
    try:
        return host, int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: bad port") from None


def family_of(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class Direction:
    """Impairments and counters of one direction of the link."""

    def __init__(self, name, params, rng):
        self.name = name
        self.params = dict(params)
        self.rng = rng
        self.down = False
        self.counters = dict.fromkeys(COUNTERS, 0)

    def plan(self):
        """Delays (seconds) at which to send one received datagram: [] drops it."""
        c = self.counters
        c["received"] += 1
        if self.down:
            c["dropped_down"] += 1
            return []
        p = self.params
        if p["loss"] > 0 and self.rng.random() * 100 < p["loss"]:
            c["lost"] += 1
            return []
        copies = 1
        if p["duplicate"] > 0 and self.rng.random() * 100 < p["duplicate"]:
            c["duplicated"] += 1
            copies = 2
        delays = []
        for _ in range(copies):
            d = p["delay"]
            if p["jitter"] > 0:
                d += self.rng.uniform(-p["jitter"], p["jitter"])
            if p["reorder"] > 0 and self.rng.random() * 100 < p["reorder"]:
                c["reordered"] += 1
                d += p["reorder-gap"]
            delays.append(max(0.0, d) / 1000.0)
        return delays


class Proxy:
    def __init__(self, loop, args):
        self.loop = loop
        self.upstream = args.upstream
        self.idle = args.idle
        self.max_clients = args.max_clients
        rng = random.Random(args.seed)
        self.dirs = {
            "up": Direction("up", self.params_for(args, "up"), random.Random(rng.random())),
            "down": Direction("down", self.params_for(args, "down"),
                              random.Random(rng.random())),
        }
        self.clients = {}  # client address -> Client
        self.listen_transport = None
        self.clients_total = 0
        self.clients_refused = 0
        self.rebinds = 0
        self.started = time.monotonic()

    @staticmethod
    def params_for(args, direction):
        out = {}
        for key in PARAM_KEYS:
            attr = key.replace("-", "_")
            specific = getattr(args, f"{direction}_{attr}")
            out[key] = float(specific if specific is not None else getattr(args, attr))
        return out

    # -- data path --------------------------------------------------------------------------
    def from_client(self, data, addr):
        client = self.clients.get(addr)
        if client is None:
            if len(self.clients) >= self.max_clients:
                self.clients_refused += 1
                return
            client = Client(self, addr)
            self.clients[addr] = client
            self.clients_total += 1
            client.connect()
        client.last_seen = self.loop.time()
        self.schedule(self.dirs["up"], data, client.send_up)

    def schedule(self, direction, data, send):
        for delay in direction.plan():
            if delay == 0:
                self.deliver(direction, data, send)
            else:
                self.loop.call_later(delay, self.deliver, direction, data, send)

    def deliver(self, direction, data, send):
        if direction.down:  # the link went down while the datagram was in flight
            direction.counters["dropped_down"] += 1
            return
        if send(data):
            direction.counters["forwarded"] += 1
        else:
            direction.counters["send_errors"] += 1

    def expire_idle(self):
        now = self.loop.time()
        for addr, client in list(self.clients.items()):
            if now - client.last_seen > self.idle:
                client.close()
                del self.clients[addr]
        self.loop.call_later(max(1.0, self.idle / 4), self.expire_idle)

    # -- control ----------------------------------------------------------------------------
    def set_down(self, which, down):
        for name in which:
            self.dirs[name].down = down

    def stats(self):
        return {"up": self.dirs["up"].counters, "down": self.dirs["down"].counters,
                "link_down": {n: d.down for n, d in self.dirs.items()},
                "clients": len(self.clients), "clients_total": self.clients_total,
                "clients_refused": self.clients_refused, "rebinds": self.rebinds,
                "seconds": round(time.monotonic() - self.started, 3)}

    def command(self, line):
        words = line.split()
        if not words:
            return "error empty command"
        verb = words[0]
        if verb == "down" and len(words) <= 2:
            which = ["up", "down"] if len(words) == 1 else [words[1]]
            if any(w not in self.dirs for w in which):
                return "error down [up|down]"
            self.set_down(which, True)
            return "ok"
        if verb == "up" and len(words) == 1:
            self.set_down(["up", "down"], False)
            return "ok"
        if verb == "set" and len(words) == 4:
            _, d, key, value = words
            which = ["up", "down"] if d == "both" else [d]
            if any(w not in self.dirs for w in which) or key not in PARAM_KEYS:
                return "error set up|down|both loss|delay|jitter|reorder|reorder-gap|duplicate V"
            try:
                v = float(value)
            except ValueError:
                return "error not a number"
            if v < 0 or (key in ("loss", "reorder", "duplicate") and v > 100):
                return "error out of range"
            for w in which:
                self.dirs[w].params[key] = v
            return "ok"
        if verb == "upstream" and len(words) == 2:
            try:
                self.upstream = parse_addr(words[1])
            except argparse.ArgumentTypeError as e:
                return f"error {e}"
            for client in self.clients.values():
                client.close()
            self.clients.clear()  # re-created, towards the new upstream, on their next datagram
            return "ok"
        if verb == "rebind" and len(words) == 1:
            for client in self.clients.values():
                client.rebind()
            self.rebinds += 1
            return "ok"
        if verb == "stats" and len(words) == 1:
            return json.dumps(self.stats())
        return f"error unknown command {line.strip()!r}"

    async def serve_control(self, reader, writer):
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                if len(line) > 1024:
                    writer.write(b"error line too long\n")
                    break
                writer.write(self.command(line.decode(errors="replace")).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass  # a control client that goes away, or the proxy stopping, ends the session
        finally:
            writer.close()


class Client:
    """One client address and its own upstream socket."""

    def __init__(self, proxy, addr):
        self.proxy = proxy
        self.addr = addr
        self.transport = None
        self.backlog = []  # datagrams due before the upstream socket exists
        self.last_seen = proxy.loop.time()
        self.closed = False

    def connect(self):
        host, port = self.proxy.upstream
        proxy = self.proxy

        class Upstream(asyncio.DatagramProtocol):
            def datagram_received(inner, data, _addr):  # noqa: N805 (closure over self)
                self.last_seen = proxy.loop.time()
                proxy.schedule(proxy.dirs["down"], data, self.send_down)

            def error_received(inner, exc):  # noqa: N805 (ICMP unreachable: the server is away)
                pass

        async def open_socket():
            try:
                transport, _ = await proxy.loop.create_datagram_endpoint(
                    Upstream, remote_addr=(host, port), family=family_of(host))
            except OSError as e:
                print(f"udp_proxy: cannot open upstream socket for {self.addr}: {e}",
                      file=sys.stderr)
                return
            if self.closed:
                transport.close()
                return
            self.transport = transport
            for data in self.backlog:
                transport.sendto(data)
            self.backlog = []

        proxy.loop.create_task(open_socket())

    def send_up(self, data):
        if self.closed:
            return False
        if self.transport is None:
            if len(self.backlog) < 64:
                self.backlog.append(data)
                return True
            return False
        self.transport.sendto(data)
        return True

    def rebind(self):
        """A new upstream socket, so a new source port: the server sees another peer (a NAT
        rebinding). Datagrams sent up meanwhile wait in the backlog."""
        old, self.transport = self.transport, None
        if old is not None:
            old.close()
        self.connect()

    def send_down(self, data):
        t = self.proxy.listen_transport
        if t is None:
            return False
        t.sendto(data, self.addr)
        return True

    def close(self):
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Listener(asyncio.DatagramProtocol):
    def __init__(self, proxy):
        self.proxy = proxy

    def datagram_received(self, data, addr):
        self.proxy.from_client(data, addr)

    def error_received(self, exc):
        pass


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", type=parse_addr, required=True, help="HOST:PORT to listen on")
    p.add_argument("--upstream", type=parse_addr, required=True, help="HOST:PORT to forward to")
    p.add_argument("--seed", type=int, default=None, help="fixed RNG seed (repeatable runs)")
    p.add_argument("--control", help="path of a Unix control socket (see above)")
    p.add_argument("--idle", type=float, default=300.0,
                   help="seconds after which a silent client's upstream socket is closed")
    p.add_argument("--max-clients", type=int, default=4096)
    p.add_argument("--down", action="store_true", help="start with the link down")
    for key, default, what in (("loss", 0.0, "percent of datagrams lost"),
                               ("delay", 0.0, "milliseconds of delay"),
                               ("jitter", 0.0, "± milliseconds around the delay (uniform)"),
                               ("reorder", 0.0, "percent held back by --reorder-gap"),
                               ("reorder-gap", 50.0, "milliseconds a reordered one is held"),
                               ("duplicate", 0.0, "percent sent twice")):
        p.add_argument(f"--{key}", type=float, default=default, help=what)
        for d in ("up", "down"):
            p.add_argument(f"--{d}-{key}", type=float, default=None, help=argparse.SUPPRESS)
    return p


async def run(args):
    loop = asyncio.get_running_loop()
    proxy = Proxy(loop, args)
    if args.down:
        proxy.set_down(["up", "down"], True)
    host, port = args.listen
    transport, _ = await loop.create_datagram_endpoint(
        lambda: Listener(proxy), local_addr=(host, port), family=family_of(host))
    proxy.listen_transport = transport
    sock = transport.get_extra_info("socket")
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:
            pass
    bound = sock.getsockname()
    control = None
    if args.control:
        try:
            os.unlink(args.control)
        except FileNotFoundError:
            pass
        control = await asyncio.start_unix_server(proxy.serve_control, path=args.control)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    loop.add_signal_handler(signal.SIGUSR1, proxy.set_down, ["up", "down"], True)
    loop.add_signal_handler(signal.SIGUSR2, proxy.set_down, ["up", "down"], False)
    loop.call_later(max(1.0, args.idle / 4), proxy.expire_idle)
    print(f"listening on {bound[0]}:{bound[1]}", flush=True)
    await stop
    transport.close()
    for client in proxy.clients.values():
        client.close()
    if control is not None:
        control.close()
        try:
            os.unlink(args.control)
        except OSError:
            pass
    print(json.dumps(proxy.stats()), flush=True)


def main(argv=None):
    args = build_parser().parse_args(argv)
    for d in ("up", "down"):
        params = Proxy.params_for(args, d)
        for key in ("loss", "reorder", "duplicate"):
            if not 0 <= params[key] <= 100:
                sys.exit(f"udp_proxy: --{key} must be 0..100")
        if any(v < 0 for v in params.values()):
            sys.exit("udp_proxy: negative value")
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
