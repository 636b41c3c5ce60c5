"""Ctrl-C and cluster preemption: SIGINT/SIGTERM during training finish the current step, write a checkpoint and
print the command that resumes; a second signal aborts at once.

    with StopRequest() as stop:
        while ...:
            train_step()
            if stop.agreed(runtime): save a checkpoint, say resume_command(cfg), return

Under torchrun every rank must stop after the same step (a rank that stops alone leaves the others waiting in the
next all-reduce forever), so `agreed` all-reduces the flag: one rank's signal stops them all.
"""

from __future__ import annotations

import os
import shlex
import signal
import threading
import time

import torch

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_COMMAND: list[str] | None = None  # `tuneforge train` arguments of this process, when started from the CLI


def set_command(argv: list[str] | None) -> None:
    """Record the `tuneforge train` arguments so the resume hint repeats them exactly (None: forget them)."""
    global _COMMAND
    _COMMAND = None if argv is None else list(argv)


def resume_command(cfg, world_size: int = 1) -> str:
    """The command that continues this run: the user's own arguments (or the saved config) + training.resume=auto."""
    args = _COMMAND if _COMMAND is not None else [os.path.join(cfg.output_dir, "tuneforge_config.yaml")]
    args = [a for a in args if not a.startswith(("training.resume=", "overwrite_output_dir="))]
    args.append("training.resume=auto")
    if cfg.overwrite_output_dir:
        args.append("overwrite_output_dir=false")  # the config file may set it; with resume it is an error
    launcher = ["tuneforge"]
    if world_size > 1:
        launcher = ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', world_size)}", "-m",
                    "tuneforge"]
    return shlex.join([*launcher, "train", *args])


class StopRequest:
    """Installs SIGINT/SIGTERM handlers for the duration of the loop (main thread only; elsewhere a no-op)."""

    # Ctrl-C on a torchrun job reaches each worker twice within milliseconds: from the terminal (same process group)
    # and forwarded by torchrun. Under torchrun a repeat that quick is that echo, not the user's second Ctrl-C.
    echo_window_s = 1.0

    STEP_NOTICE = "finishing the current step, then saving a checkpoint"
    FINAL_NOTICE = "finishing the final evaluation and saving the final model"  # the run is trained: keep it

    # A signal taken after the last step (the loop's final evaluation) is handed to the final save's request, so the
    # user's next Ctrl-C there is the second one, which aborts, as the first notice said
    _final_signal: tuple[int, float] | None = None

    def __init__(self, notice: str = STEP_NOTICE):
        self.notice = notice  # what the first signal does, said when it comes
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if self.notice == self.FINAL_NOTICE and StopRequest._final_signal is not None:
            self.signum, self._first_at = StopRequest._final_signal
        StopRequest._final_signal = None
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self.notice == self.FINAL_NOTICE and self.signum is not None and exc_type is None:
            StopRequest._final_signal = (self.signum, self._first_at)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            if "TORCHELASTIC_RUN_ID" in os.environ and time.monotonic() - self._first_at < self.echo_window_s:
                return
            raise KeyboardInterrupt  # the second signal: abort now, whatever the step is doing
        self.signum, self._first_at = signum, time.monotonic()
        if os.environ.get("LOCAL_RANK", "0") != "0":
            return  # under torchrun every process gets the signal: one notice per node, from its first process
        # os.write, not print: a handler that prints while the interrupted code prints raises "reentrant call"
        os.write(2, f"\n{signal.Signals(signum).name} received: {self.notice} (press Ctrl-C again to abort "
                    f"without saving)\n".encode())

    def agreed(self, runtime) -> bool:
        """Whether any rank was asked to stop (every rank gets the same answer at the same step)."""
        if not runtime.distributed:
            return self.signum is not None
        flag = torch.tensor(1.0 if self.signum is not None else 0.0, device=runtime.device)
        return bool(runtime.all_reduce_sum(flag).item() > 0)
