"""Named fault points for crash tests: `CONCH_FAULT_POINT=name[:n[:SIGNAL]]` sends the process SIGNAL
(default SIGKILL; e.g. SIGTERM, SIGINT) the n-th time (default 1st) execution reaches `fault_point(name)`.
Unset (always, outside tests) it costs one dict lookup. Points: generation (after each batch of teacher
answers), step, checkpoint, adapter, register."""

import os
import signal

_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get("CONCH_FAULT_POINT")
    if not spec:
        return
    target, _, rest = spec.partition(":")
    if target != name:
        return
    nth, _, signame = rest.partition(":")
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(nth or 1):
        os.kill(os.getpid(), getattr(signal, signame or "SIGKILL"))
