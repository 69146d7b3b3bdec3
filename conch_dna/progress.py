"""A progress bar for entry points (CLI, scripts): a receiver of the distillation signals, drawn with rich.

    with ProgressBar():                    # draws only when stderr is a terminal
        distiller.distill_domain("thinking")

It shows the teacher answering the domain's prompts, then the training steps (ETA, tokens/s, losses), then
the held-out judging. Why rich: while the bar is live it redirects `sys.stderr` and prints what is written
there above the bar, and our structlog set-up (`log_setup.py`) resolves `sys.stderr` at every write, so log
lines and the bar never interleave. When stderr is not a terminal nothing is drawn: the log's lines (one
"step" line every tenth of the run) are the progress.

The library never draws: like logging, the bar is set up by the entry point.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from conch_dna.training.kd import signals


class ProgressBar:
    """Receivers of the distillation signals that draw one line per phase of each domain's run."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.enabled = self.console.is_terminal
        self.progress = Progress(
            TextColumn("{task.description:<28}"), BarColumn(bar_width=30), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=self.console, redirect_stderr=True, redirect_stdout=False,
        )
        self.tasks: dict[tuple[str, str], TaskID] = {}  # (run_id, phase) -> task
        self._receivers = [
            (signals.distillation_started, self.on_started), (signals.teacher_progress, self.on_teacher_progress), (signals.teacher_data_ready, self.on_teacher_ready),
            (signals.step_completed, self.on_step), (signals.domain_completed, self.on_done),
            (signals.distillation_failed, self.on_failed),
        ]

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            self.progress.start()
            for signal, receiver in self._receivers:
                signal.connect(receiver, weak=False)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            for signal, receiver in self._receivers:
                signal.disconnect(receiver)
            self.progress.stop()

    # ------------------------------------------------------------------------------------ receivers

    def _task(self, kw: dict, phase: str, total: int | None, label: str) -> TaskID:
        key = (kw["run_id"], phase)
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(f"{label} {kw['domain']}", total=total, info="")
        return self.tasks[key]

    def on_started(self, sender, **kw) -> None:  # the teacher starts answering now: its clock starts here
        self._task(kw, "teacher", kw["prompts"] or None, "teacher answers")

    def on_teacher_progress(self, sender, **kw) -> None:
        task = self._task(kw, "teacher", kw["total"], "teacher answers")
        self.progress.update(task, completed=kw["done"], info="prompts")

    def on_teacher_ready(self, sender, **kw) -> None:
        task = self._task(kw, "teacher", kw["samples"], "teacher answers")
        info = "cached" if kw["cached"] else f"{kw['tokens']} tokens in {kw['seconds']:.0f} s"
        self.progress.update(task, total=kw["samples"], completed=kw["samples"], info=info)

    def on_step(self, sender, **kw) -> None:
        task = self._task(kw, "train", kw["iters"], "training")
        self.progress.update(task, completed=kw["step"], info=f"loss {kw['loss']:.4f} kd {kw['kd']:.4f} ce {kw['ce']:.4f} "
                                                               f"{kw['tokens_per_second']:.0f} tok/s")
        if kw["step"] == kw["iters"]:  # the distiller saves the adapter and judges it next
            self._task(kw, "judge", None, "judging held-out")

    def on_done(self, sender, **kw) -> None:
        held = kw["result"].get("held_out") or {}
        if (key := (kw["run_id"], "judge")) in self.tasks:
            info = f"KL {held['kl']:.3f} agreement {held['agreement']:.3f} repetition {held['repetition']:.3f}" if held else ""
            self.progress.update(self.tasks[key], total=1, completed=1, info=info)

    def on_failed(self, sender, **kw) -> None:
        unfinished = {t.id for t in self.progress.tasks if not t.finished}
        for (run_id, _), task in self.tasks.items():
            if run_id == kw["run_id"] and task in unfinished:
                self.progress.update(task, info="stopped" if kw["cancelled"] else f"failed: {kw['error_type']}")
                self.progress.stop_task(task)


__all__ = ["ProgressBar"]
