"""Take the deploy lock of prod/api in a separate process, for the lock tests.

Usage: lock_holder.py URL ENVIRONMENT FRAISE RUN_ID HOLD_SECONDS WAIT_SECONDS

Prints one JSON line when the lock is taken ({"event": "locked"}) or refused ({"event":
"held", ...}, exit status 4), then holds it for HOLD_SECONDS and prints {"event": "released"}.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

from fraisier.db import open_store
from fraisier.errors import ExitCode, LockHeldError
from fraisier.records import LockHolder, utc_now


def main() -> int:
    """Take the lock named on the command line and hold it."""
    url, environment, fraise, run_id, hold, wait = sys.argv[1:7]
    store = open_store(url)
    holder = LockHolder(run_id, "tester", socket.gethostname(), utc_now(), os.getpid())
    started = time.monotonic()
    try:
        with store.lock(environment, fraise, holder, wait_seconds=float(wait)):
            waited = time.monotonic() - started
            print(json.dumps({"event": "locked", "run_id": run_id, "waited": waited}), flush=True)
            time.sleep(float(hold))
    except LockHeldError as exc:
        print(json.dumps({"event": "held", "message": str(exc), "holder": exc.holder}), flush=True)
        return int(ExitCode.LOCK_HELD)
    finally:
        store.close()
    print(json.dumps({"event": "released", "run_id": run_id}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
