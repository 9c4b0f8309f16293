#!/usr/bin/env python3
"""Regenerates cmake/hot-functions.txt: the functions tb-agent runs once it is up.

Runs the Release agent (10 file sources at 1 s, delivering to the bench's sink) under callgrind
with instrumentation off, switches it on after start-up (past the 10 s at which the agent gives
its start-up memory back, util/memory.hpp), records 70 s of the running loop (past the work
done once a minute), and writes every
function of the tb-agent binary that ran, mangled, in the order callgrind first saw them.
cmake/Footprint.cmake hands the list to lld (--symbol-ordering-file).

    bench/hot_functions.py --build build-bench     # needs valgrind; then rebuild tb-agent
    # then the packages' build (scripts/build-packages.sh, -O2 and Debian's hardening flags):
    bench/hot_functions.py --build build-bench --agent build-pkg/src/tb-agent --add
    bench/hot_functions.py --rodata-only           # only cmake/hot-rodata.ld, from the list
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
                # callgrind names a recursion level `name'2`: the same function.
                name = (names.get(m.group(2)) or "").split("'")[0]
                found.setdefault(name, None)
    return [n for n in found if n]


def section_names(name):
    """The names a function's sections may carry: GCC emits a constructor or destructor whose
    complete-object (C1/D1) and base-object (C2/D2) forms are the same code once, in sections
    named after C2/D2, while callgrind may report the C1/D1 alias."""
    out = [name]
    for whole, base in (("C1E", "C2E"), ("D1E", "D2E")):
        at = name.rfind(whole)
        if at > 0:
            out.append(name[:at] + base + name[at + 3:])
    return out


# Runs once, after start-up, and goes on right after it unmapped the code: not in the 70 s
# profile, but wherever it lies the page it returns to comes back with a 64 KiB window.
RELEASE = ["_ZN2tb22release_startup_memoryEv"]


# The loop's read-only data, found by protecting every page of .rodata after start-up in a
# throwaway build and logging the faults (docs/performance.md, "On a booted systemd host"): the
# string constants (one merged section per kind), small constants, the jump tables of the hot
# functions (a function's is `.rodata.<its name>` with -ffunction-sections), the float
# conversion tables of std::to_chars/from_chars (libstdc++'s, which has one section per table),
# unordered_map's prime list, and the read-only data of the SQLite objects whose code is hot
# (Debian's libsqlite3.a has one section per source file).
#
# String constants: our own objects name theirs after the function (`.rodata.<function>.str1.1`,
# the list below places the hot ones); what is left in the plain pools of our objects, of
# main.cpp's and of libstdc++'s is small and taken whole. Not everybody's: yaml-cpp's pools and
# those of SQLite's cold objects (the parser's messages) made .rodata.hot 109 KiB, two windows;
# without them it is ~50 KiB, one (docs/performance.md, sixth round). The hot SQLite objects'
# pools come with their `.rodata` below.
OWN_STRING_POOLS = "*libtb_*.a:*({0}) *main.cpp.o({0}) *libstdc++.a:*({0})"
RODATA_ALWAYS = [
    ".rodata.cst2 .rodata.cst4 .rodata.cst8 .rodata.cst16 .rodata.cst32",
    OWN_STRING_POOLS.format(".rodata.str1.1"),
    ".rodata._ZN12_GLOBAL__N_13ryuL17DOUBLE_POW5_SPLITE "
    ".rodata._ZN12_GLOBAL__N_13ryuL21DOUBLE_POW5_INV_SPLITE .rodata._ZN12_GLOBAL__N_13ryuL11DIGIT_TABLEE",
    ".rodata._ZN12_GLOBAL__N_110fast_float15powers_templateIvE17power_of_five_128E "
    ".rodata._ZN12_GLOBAL__N_110fast_floatL20powers_of_ten_uint64E",
    ".rodata._ZZNSt8__detail18__to_chars_10_impl* .rodata._ZZNSt8__detail25__from_chars_alnum_to_val*",
    ".rodata._ZNSt8__detail12__prime_listE",
    ".rodata._ZN12_GLOBAL__N_110fast_floatL20powers_of_ten_doubleE "
    ".rodata._ZN12_GLOBAL__N_120floating_type_traitsIdE20pow10_adjustment_tabE "
    ".rodata._ZZNSt12_GLOBAL__N_114starts_with_ci*",
    # The agent's own constants and jump tables (-fdata-sections, -ffunction-sections): small.
    # Not its functions' strings (`.rodata._ZN2tb….str1.1` and `.str1.8`, hence the [!18]):
    # those of the cold ones (configuration errors, help) were 26 KiB.
    ".rodata._ZN2tb*[!18]",
    OWN_STRING_POOLS.format(".rodata.str1.8"),
]
# SQLite's shared tables (sqlite3UpperToLower, sqlite3CtypeMap): an object with no code.
SQLITE_DATA_OBJECTS = ["global.o"]

RODATA_HEADER = """\
/* Generated by bench/hot_functions.py from cmake/hot-functions.txt: the read-only data the
   running loop touches, in one output section before .rodata (cmake/Footprint.cmake), so it
   comes back in one 64 KiB fault-around window (under 64 KiB, aligned, and the binary loaded
   at a 64 KiB boundary) instead of six spread over all of .rodata.
   Patterns that match nothing (another libstdc++, a shared SQLite) cost nothing. */
"""


def write_rodata_script(names, out):
    lines = ["SECTIONS", "{",
             "  /* Aligned to a fault-around window: up to 64 KiB of padding in the file, never",
             "     resident. */",
             "  .rodata.hot ALIGN(0x10000) : {"]
    # An entry names its files itself, or is every file's.
    lines += [f"    {p}" if "(" in p else f"    *({p})" for p in RODATA_ALWAYS]
    # A hot function's jump tables, and its string constants where a library was built with
    # one section per function for them too (libstdc++'s `.rodata.<function>.str1.1`).
    lines += [f"    *(.rodata.{s} .rodata.{s}.str1.1 .rodata.{s}.str1.8)"
              for n in names for s in section_names(n)]
    hot = set(names)
    objects = set()
    archive = subprocess.run(["cc", "-print-file-name=libsqlite3.a"], capture_output=True,
                             text=True).stdout.strip()
    if os.path.isabs(archive) and os.path.exists(archive):
        listing = subprocess.run(["nm", "-A", "--defined-only", archive],
                                 capture_output=True, text=True).stdout
        for line in listing.splitlines():
            # /usr/lib/…/libsqlite3.a:btree.o:0000000000001234 T sqlite3BtreeInsert
            where, _, rest = line.rpartition(":")
            parts = rest.split()
            if len(parts) == 3 and parts[1] in "tTwW" and parts[2] in hot:
                objects.add(where.rsplit(":", 1)[1])
    objects.update(SQLITE_DATA_OBJECTS)
    lines += [f"    *libsqlite3.a:{o}(.rodata .rodata.*)" for o in sorted(objects)]
    lines += ["  }", "}", "INSERT BEFORE .rodata;"]
    Path(out).write_text(RODATA_HEADER + "\n".join(lines) + "\n")
    print(f"read-only data of {len(names)} functions and {len(objects)} SQLite objects: {out}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=str(run.SRC / "build-bench"))
    ap.add_argument("--out", default=str(run.SRC / "cmake/hot-functions.txt"))
    ap.add_argument("--rodata-out", default=str(run.SRC / "cmake/hot-rodata.ld"))
    ap.add_argument("--rodata-only", action="store_true",
                    help="write the linker script from the existing function list, no profile")
    ap.add_argument("--agent", help="the tb-agent binary to profile (default: the build's); "
                    "the sink is still the build's tb-test-server")
    ap.add_argument("--add", action="store_true",
                    help="add the functions found to the existing list instead of replacing it")
    args = ap.parse_args()
    if args.rodata_only:
        names = [n.strip() for n in Path(args.out).read_text().splitlines()
                 if n.strip() and not n.startswith("#")]
        write_rodata_script(names, args.rodata_out)
        return
    build = Path(args.build)
    binary = str(Path(args.agent or build / "src/tb-agent").resolve())
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
    if args.add:
        # The list serves every build of the agent: one built with other flags (the packages'
        # -O2 against Release's -O3) inlines and clones differently, and runs functions of other
        # names (`.isra.0`, `.part.0`, `.constprop.0`). lld ignores names a binary lacks.
        old = [n.strip() for n in Path(args.out).read_text().splitlines()
               if n.strip() and not n.startswith("#")]
        known = set(old)
        names = old + [n for n in names if n not in known]
    Path(args.out).write_text(HEADER + "\n".join(names) + "\n")
    print(f"{len(names)} functions written to {args.out}")
    write_rodata_script(names, args.rodata_out)


if __name__ == "__main__":
    main()
