#!/usr/bin/env python3
"""bench/lib/callgrind.py: per-request figures from a callgrind dump.

    callgrind.py DUMP REQUESTS [TOP]

Prints one JSON line, {"instructions": ..., "sha256_portable": ...,
"allocations": ...} per request (instructions executed in user space but
SHA-256's; SHA-256's, which valgrind runs without SHA-NI; calls into the
C allocator: malloc, calloc and the aligned ones), then
the TOP functions by self instructions per request. Callgrind counts
instructions, not time, so the figures repeat to within about 1% from run
to run, where req/s on a shared machine moves by 20%; they leave out the
kernel and clock reads (vDSO calls are not simulated).
"""

import collections
import json
import re
import sys


ALLOCATORS = ("malloc", "calloc", "posix_memalign", "aligned_alloc")


def parse(path):
    names, self_cost = {}, collections.Counter()
    calls = collections.Counter()
    fn = cfn = None
    pending = None

    def name(token):
        m = re.match(r"\((\d+)\)(?: (.*))?", token)
        if m.group(2):
            names[m.group(1)] = m.group(2)
        return m.group(1)

    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("fn="):
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
    return names, self_cost, calls


def main():
    path, requests = sys.argv[1], int(sys.argv[2])
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    names, self_cost, calls = parse(path)
    total = sum(self_cost.values())
    # Counted at the C allocator: with LTO `__rust_alloc` is inlined away.
    allocs = sum(n for f, n in calls.items() if names.get(f) in ALLOCATORS)
    # Under valgrind, sha2 finds no SHA-NI and runs its portable code, which
    # costs far more instructions than on the real CPU: reported apart.
    sha = sum(c for f, c in self_cost.items() if "sha2::" in names.get(f, ""))
    print(json.dumps({
        "requests": requests,
        "instructions": round((total - sha) / requests),
        "sha256_portable": round(sha / requests),
        "allocations": round(allocs / requests, 1),
    }))
    for f, cost in self_cost.most_common(top):
        print(f"{cost / requests:8.0f} {100 * cost / total:5.1f}%  {names.get(f, f)[:140]}")


if __name__ == "__main__":
    main()
