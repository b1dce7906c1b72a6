#!/usr/bin/env python3
"""bench/lib/callgrind.py: per-request figures from a callgrind dump.

    callgrind.py DUMP REQUESTS [TOP [WIDTH]]

Prints one JSON line, {"instructions": ..., "sha256_portable": ...,
"allocations": ..., and with a cache simulation "ll_data_misses",
"l1_data_misses" and "l1_instruction_misses": ...} per request (instructions executed in user space but
SHA-256's; SHA-256's, which valgrind runs without SHA-NI; calls into the
C allocator: malloc, calloc and the aligned ones, or mimalloc's), then
the TOP functions by self instructions per request. Callgrind counts
instructions, not time, so the figures repeat to within about 1% from run
to run, where req/s on a shared machine moves by 20%; they leave out the
kernel and clock reads (vDSO calls are not simulated).
"""

import collections
import json
import re
import sys


# glibc's entry points, and mimalloc's for Rust's global allocator (which
# calls the aligned ones for every allocation; they do not call each other).
ALLOCATORS = (
    "malloc", "calloc", "posix_memalign", "aligned_alloc",
    "mi_malloc_aligned", "mi_zalloc_aligned",
)


def parse(path):
    """Self instructions and, with a cache simulation, self last-level data
    misses (reads + writes) per function; calls per callee."""
    names, self_cost = {}, collections.Counter()
    misses, calls = collections.Counter(), collections.Counter()
    l1, i1 = collections.Counter(), collections.Counter()
    fn = cfn = None
    pending = None
    ll = None  # columns of DLmr and DLmw, when the dump has them
    d1 = i1col = None  # and of D1mr and D1mw, and of I1mr

    def name(token):
        m = re.match(r"\((\d+)\)(?: (.*))?", token)
        if m.group(2):
            names[m.group(1)] = m.group(2)
        return m.group(1)

    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("events:"):
                events = line.split()[1:]
                if "DLmr" in events:
                    ll = (events.index("DLmr") + 1, events.index("DLmw") + 1)
                    d1 = (events.index("D1mr") + 1, events.index("D1mw") + 1)
                    i1col = events.index("I1mr") + 1
            elif line.startswith("fn="):
                fn = name(line[3:])
            elif line.startswith("cfn="):
                cfn = name(line[4:])
            elif line.startswith("calls="):
                pending = int(line[6:].split()[0])
            elif line[:1].isdigit() or line[:1] in "+-*":
                parts = line.split()
                if len(parts) < 2:
                    continue
                if pending is not None:
                    calls[cfn] += pending
                    pending = None
                else:
                    self_cost[fn] += int(parts[1])
                    if ll:
                        # Trailing zero columns are left out of a cost line.
                        column = lambda i: int(parts[i]) if i < len(parts) else 0  # noqa: E731
                        misses[fn] += column(ll[0]) + column(ll[1])
                        l1[fn] += column(d1[0]) + column(d1[1])
                        i1[fn] += column(i1col)
    return names, self_cost, calls, misses, l1, i1


def main():
    path, requests = sys.argv[1], int(sys.argv[2])
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    width = int(sys.argv[4]) if len(sys.argv) > 4 else 140
    names, self_cost, calls, misses, l1, i1 = parse(path)
    total = sum(self_cost.values())
    # Counted at the C allocator: with LTO `__rust_alloc` is inlined away.
    # With --separate-callers a name carries its callers ("f'caller'...").
    bare = {f: n.split("'")[0] for f, n in names.items()}
    allocs = sum(n for f, n in calls.items() if bare.get(f) in ALLOCATORS)
    # Under valgrind, sha2 finds no SHA-NI and runs its portable code, which
    # costs far more instructions than on the real CPU: reported apart.
    sha = sum(c for f, c in self_cost.items() if "sha2::" in bare.get(f, ""))
    summary = {
        "requests": requests,
        "instructions": round((total - sha) / requests),
        "sha256_portable": round(sha / requests),
        "allocations": round(allocs / requests, 1),
    }
    if misses:
        summary["ll_data_misses"] = round(sum(misses.values()) / requests, 1)
        summary["l1_data_misses"] = round(sum(l1.values()) / requests, 1)
        summary["l1_instruction_misses"] = round(sum(i1.values()) / requests, 1)
    print(json.dumps(summary))
    # With a cache simulation the costliest functions are those that miss most.
    ranked = misses if misses else self_cost
    whole = sum(ranked.values()) or 1
    for f, cost in ranked.most_common(top):
        print(f"{cost / requests:8.1f} {100 * cost / whole:5.1f}%  {names.get(f, f)[:width]}")


if __name__ == "__main__":
    main()
