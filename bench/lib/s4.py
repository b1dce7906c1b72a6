#!/usr/bin/env python3
"""bench/lib/s4.py: the S4 scenario's client (Python 3 standard library only).

Sends N (default 64) identical POSTs with one Idempotency-Key at the same
moment: every client opens its own connection first, all wait on a barrier,
then all send. Prints one JSON object: how many clients got an answer, and
how many got which answer (status, Idempotent-Replayed, problem code), plus
the spread of their response times.

    s4.py --url http://127.0.0.1:8080/wait --key k1 --clients 64 --delay-ms 200

`--delay-ms` is sent as `X-Bench-Delay-Ms`, which bench_upstream honours, so
the first attempt keeps the key in flight for that long.
"""

import argparse
import collections
import http.client
import json
import threading
import time
import urllib.parse

BODY = b'{"sku":"S4","qty":1,"note":"concurrent duplicates"}'


def one(host, port, path, headers, barrier, out, i):
    conn = None
    try:
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.connect()
        barrier.wait(timeout=30)
        start = time.perf_counter()
        conn.request("POST", path, body=BODY, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        elapsed_ms = (time.perf_counter() - start) * 1000
        code = None
        if resp.getheader("Content-Type", "").startswith("application/problem+json"):
            try:
                code = json.loads(body).get("code")
            except ValueError:
                code = "unparsable"
        out[i] = {
            "status": resp.status,
            "replayed": resp.getheader("Idempotent-Replayed") == "true",
            "code": code,
            "ms": elapsed_ms,
        }
    except Exception as error:  # a client that got no answer is what we count
        out[i] = {"status": None, "error": f"{type(error).__name__}: {error}"}
    finally:
        if conn is not None:
            conn.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--delay-ms", type=int, default=200)
    args = ap.parse_args()

    url = urllib.parse.urlsplit(args.url)
    headers = {
        "Content-Type": "application/json",
        "Idempotency-Key": args.key,
        "X-Bench-Delay-Ms": str(args.delay_ms),
    }
    barrier = threading.Barrier(args.clients)
    out = [None] * args.clients
    threads = [
        threading.Thread(
            target=one,
            args=(url.hostname, url.port, url.path, headers, barrier, out, i),
        )
        for i in range(args.clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    answers = collections.Counter()
    errors = collections.Counter()
    times = []
    for r in out:
        if r is None or r.get("status") is None:
            errors[(r or {}).get("error", "no result")] += 1
            continue
        label = str(r["status"])
        if r["replayed"]:
            label += " replayed"
        if r["code"]:
            label += f" {r['code']}"
        answers[label] += 1
        times.append(r["ms"])
    times.sort()
    print(
        json.dumps(
            {
                "clients": args.clients,
                "answered": sum(answers.values()),
                "answers": dict(sorted(answers.items())),
                "errors": dict(errors),
                "ms_min": round(times[0], 1) if times else None,
                "ms_median": round(times[len(times) // 2], 1) if times else None,
                "ms_max": round(times[-1], 1) if times else None,
            }
        )
    )


if __name__ == "__main__":
    main()
