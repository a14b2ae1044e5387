"""The floor under wake-up latency: a bare LISTEN client, ``python -m bench.notify_floor URL``.

One thread, one connection, no claim: it prints when each notification arrived. The
benchmark NOTIFYs it the way an enqueue does; what it measures is the server's delivery
and this machine's scheduling, which every queue's wake-up sits on.
"""

from __future__ import annotations

import json
import sys
import time

import psycopg

CHANNEL = "kiln_bench_floor"


def main(argv: list[str] | None = None) -> int:
    """Listen and report until killed."""
    url = (argv if argv is not None else sys.argv[1:])[0]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"LISTEN {CHANNEL}")
        print(json.dumps({"event": "listening", "t": time.monotonic()}), flush=True)
        for note in conn.notifies():
            print(json.dumps({"event": "notify", "key": note.payload, "t": time.monotonic()}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
