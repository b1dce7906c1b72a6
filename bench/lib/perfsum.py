#!/usr/bin/env python3
"""bench/lib/perfsum.py: summarises `perf script` output (with call chains).

    perf script -i s1.data --no-inline | perfsum.py > s1-summary.txt

Prints, as percentages of all samples:
  1. self time by category (kernel, allocator, tokio, hyper, tracing, ...);
  2. the top symbols by self time;
  3. the top symbols by inclusive time (a symbol counts once per sample in
     which it appears anywhere on the stack), with idemgate's own functions
     listed separately, which is where the proxy's own costs show.
"""

import collections
import re
import sys

CATEGORIES = [
    # (name, test on (symbol, dso)); first match wins
    ("kernel (syscalls, loopback TCP, scheduler)", lambda s, d: "kernel" in d or d.startswith("[")),
    ("allocator (malloc/free/realloc)", lambda s, d: re.search(r"malloc|free|realloc|calloc|_int_|tcache|arena|sysmalloc|alloc::alloc|__rust_(de|re)?alloc", s) is not None),
    ("memcpy/memmove/memset", lambda s, d: re.search(r"mem(cpy|move|set|cmp)|__memcpy|__memmove", s) is not None),
    ("SHA-256 (sha2)", lambda s, d: "sha2" in s or "sha256" in s.lower()),
    ("tracing / tracing-subscriber", lambda s, d: s.startswith(("tracing", "<tracing")) or "tracing_subscriber" in s or "tracing_core" in s),
    ("metrics (prometheus-client)", lambda s, d: "prometheus_client" in s),
    ("redis client", lambda s, d: "redis::" in s or "combine::" in s),
    ("hyper-util client pool", lambda s, d: "hyper_util::client" in s),
    ("hyper-util server (auto)", lambda s, d: "hyper_util::server" in s or "hyper_util::rt" in s),
    ("hyper (HTTP/1 codec, dispatch)", lambda s, d: "hyper::" in s or "httparse" in s or "h2::" in s),
    ("http types (HeaderMap, Uri, ...)", lambda s, d: s.startswith(("http::", "<http::")) or "http::header" in s or "http::uri" in s),
    ("tokio runtime, timers, I/O driver", lambda s, d: "tokio::" in s or "mio::" in s or "tokio_util" in s),
    ("idemgate", lambda s, d: "idemgate" in s),
    ("hashing, formatting, std", lambda s, d: s.startswith(("core::", "<core::", "std::", "<std::", "alloc::", "<alloc::", "hashbrown", "<&", "<str"))),
    ("libc (other)", lambda s, d: "libc" in d),
]


def category(sym, dso):
    for name, test in CATEGORIES:
        if test(sym, dso):
            return name
    return "other"


FRAME = re.compile(r"^\s*([0-9a-f]+)\s+(.*?)\s+\((.*)\)\s*$")


def samples(lines):
    frames = []
    in_sample = False
    for line in lines:
        if not line.strip():
            if in_sample:
                yield frames
            frames, in_sample = [], False
            continue
        if not line[0].isspace():
            if in_sample:
                yield frames
            frames, in_sample = [], True
            continue
        m = FRAME.match(line)
        if m:
            sym = re.sub(r"\+0x[0-9a-f]+$", "", m.group(2))
            sym = re.sub(r"::h[0-9a-f]{16}$", "", sym)
            frames.append((sym, m.group(3)))
    if in_sample:
        yield frames


def short(sym, width=110):
    return sym if len(sym) <= width else sym[: width - 1] + "…"


def main():
    total = 0
    cats = collections.Counter()
    self_sym = collections.Counter()
    incl = collections.Counter()
    for frames in samples(sys.stdin):
        if not frames:
            continue
        total += 1
        sym, dso = frames[0]
        cats[category(sym, dso)] += 1
        self_sym[sym] += 1
        for s in {s for s, _ in frames}:
            incl[s] += 1
    if not total:
        raise SystemExit("no samples")

    def pct(n):
        return f"{100 * n / total:5.1f}%"

    print(f"{total} samples\n")
    print("Self time by category")
    for name, n in cats.most_common():
        print(f"  {pct(n)}  {name}")
    print("\nTop 40 symbols by self time")
    for s, n in self_sym.most_common(40):
        print(f"  {pct(n)}  {short(s)}")
    print("\nTop 40 idemgate functions by inclusive time")
    own = [(s, n) for s, n in incl.most_common() if "idemgate" in s]
    for s, n in own[:40]:
        print(f"  {pct(n)}  {short(s)}")
    print("\nTop 60 symbols by inclusive time (any crate)")
    for s, n in incl.most_common(60):
        print(f"  {pct(n)}  {short(s)}")


if __name__ == "__main__":
    main()
