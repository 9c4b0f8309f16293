#!/usr/bin/env python3
"""Regenerates cmake/hot-functions.txt: the functions tb-agent runs once it is up.

Runs the Release agent (10 file sources at 1 s, delivering to the bench's sink) under callgrind
with instrumentation off, switches it on after start-up (past the 10 s at which the agent gives
its start-up memory back, util/memory.hpp), records 70 s of the running loop (past the work
done once a minute), and writes every
function of the tb-agent binary that ran, mangled, in the order callgrind first saw them.
cmake/Footprint.cmake hands the list to lld (--symbol-ordering-file).

    bench/hot_functions.py --build build-bench     # needs valgrind; then rebuild tb-agent
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (the bench's sink and agent helpers)

HEADER = """\
# The functions tb-agent runs once it is up (10 file sources at 1 s delivering to the bench's
# sink), which the linker lays out first and together (cmake/Footprint.cmake). After start-up
# the agent unmaps its own code (util/memory.hpp); what the loop faults back in is then these
# pages, not a 64 KiB fault-around window in every part of a 2.5 MB binary. Regenerate with
# `bench/hot_functions.py` after large changes; a name that no longer exists is ignored.
"""


def functions_of(profile, binary):
    """Mangled names of the functions of `binary` that have costs in a callgrind profile."""
    objects, names, found = {}, {}, {}
    current = None
    for line in open(profile, errors="replace"):
        line = line.rstrip("\n")
        # An object or function is named the first time it appears, also as a callee (cob=,
        # cfn=), and by its number only after that.
        m = re.match(r"^(c?)ob=\((\d+)\)(?: (.*))?$", line)
        if m:
            if m.group(3):
                objects[m.group(2)] = m.group(3)
            if not m.group(1):
                current = objects.get(m.group(2))
            continue
        m = re.match(r"^(c?)fn=\((\d+)\)(?: (.*))?$", line)
        if m:
            if m.group(3):
                names[m.group(2)] = m.group(3)
            if not m.group(1) and current == binary:
                found.setdefault(names.get(m.group(2)), None)
    return [n for n in found if n]


# Runs once, after start-up, and goes on right after it unmapped the code: not in the 70 s
# profile, but wherever it lies the page it returns to comes back with a 64 KiB window.
RELEASE = ["_ZN2tb22release_startup_memoryEv"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=str(run.SRC / "build-bench"))
    ap.add_argument("--out", default=str(run.SRC / "cmake/hot-functions.txt"))
    args = ap.parse_args()
    build = Path(args.build)
    binary = str((build / "src/tb-agent").resolve())
    with tempfile.TemporaryDirectory(prefix="tb-hot-") as work:
        sink = run.Sink(build, work)
        try:
            d = run.agent_dir(work, sink.port, "")
            (d / "agent.yaml").write_text((d / "agent.yaml").read_text().replace(
                "sources:\n", "sources:\n" + run.file_sources(d, 10, "1s")))
            profile = Path(work) / "callgrind.out"
            p = subprocess.Popen(
                ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--demangle=no",
                 f"--callgrind-out-file={profile}", binary, "--config", str(d / "agent.yaml")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(15)
            subprocess.run(["callgrind_control", "-i", "on", str(p.pid)], check=True,
                           stdout=subprocess.DEVNULL)
            time.sleep(70)
            subprocess.run(["callgrind_control", "-i", "off", str(p.pid)], check=True,
                           stdout=subprocess.DEVNULL)
            run.stop(p)
        finally:
            sink.close()
        names = functions_of(profile, binary)
    if not names:
        sys.exit("no function of tb-agent in the profile")
    names += [n for n in RELEASE if n not in names]
    Path(args.out).write_text(HEADER + "\n".join(names) + "\n")
    print(f"{len(names)} functions written to {args.out}")


if __name__ == "__main__":
    main()
