"""Named fault points for crash tests: `CONCH_FAULT_POINT=name[:n]` kills the process (SIGKILL) the n-th
time (default 1st) execution reaches `fault_point(name)`. Unset (always, outside tests) it costs one dict
lookup. Points: generation, step, checkpoint, adapter, register."""

import os
import signal

_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get("CONCH_FAULT_POINT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
