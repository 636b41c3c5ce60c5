"""Metrics out: a JSONL log, TensorBoard event files, a progress bar, and a loss plot at the end."""

from __future__ import annotations

import json
import time
from pathlib import Path

NOW = ("lr", "tokens_per_s", "mfu", "model_tflops", "eval_loss")  # logged as they are at the log step; every other metric as a window mean


class MetricWindow:
    """Sums of the per-step metrics since the last log line, so a logged loss is the mean over the logging window
    (logging_steps), not the last step's. Each key is averaged over the steps that reported it (a stage may leave a
    key out of a step: KTO's rewards/chosen when no row was desirable). Its state goes into checkpoints: a resumed
    run logs the same numbers."""

    def __init__(self):
        self.n, self.sums, self.counts = 0, {}, {}

    def add(self, metrics: dict) -> None:
        self.n += 1
        for key, value in metrics.items():
            if key not in NOW and isinstance(value, (int, float)):
                self.sums[key] = self.sums.get(key, 0.0) + value
                self.counts[key] = self.counts.get(key, 0) + 1

    def flush(self, metrics: dict) -> dict:
        """The window's means plus the current values of lr, tokens/s, MFU and eval loss; starts a new window."""
        out = {k: v / self.counts.get(k, self.n) for k, v in self.sums.items()} if self.n else {}
        out.update({k: metrics[k] for k in NOW if k in metrics})
        # training.eval_suite scores and the stage's own held-out metrics (eval_rewards/accuracies): as measured now
        out.update({k: v for k, v in metrics.items() if k.startswith(("suite/", "eval_"))})
        self.n, self.sums, self.counts = 0, {}, {}
        return out

    def state(self) -> dict:
        return {"n": self.n, "sums": dict(self.sums), "counts": dict(self.counts)}

    def load(self, state: dict | None) -> None:
        if state:  # checkpoints from before per-key counts: every key was in every step
            self.n, self.sums = state["n"], dict(state["sums"])
            self.counts = dict(state.get("counts") or {k: self.n for k in self.sums})


def fmt(key: str, value) -> str:
    """Numbers as people read them: losses to 4 significant digits, the learning rate in e-notation, rates whole."""
    if not isinstance(value, float):
        return str(value)
    if key == "lr":
        return f"{value:.2e}"
    if key == "mfu":  # a fraction in metrics.jsonl, a percentage on screen
        return f"{100 * value:.1f}%"
    if key.startswith("tokens_per_s") or key in ("tok/s",):
        return f"{value:.0f}"
    return f"{value:.4g}"


def record_metric(path: Path, step: int, key: str, value: float) -> None:
    """One more record after training's own (a figure measured after the loop, e.g. the reward model's pairwise
    accuracy), so metrics.jsonl and the model card read from it hold it too."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, key: float(f"{value:.9g}"), "time": round(time.time(), 3)}) + "\n")


def as_record(step: int, metrics: dict) -> dict:
    """A metrics.jsonl row (without its time). 9 significant digits, not 8 decimals: a tiny model's model_tflops
    (1e-4) or a late lr (1e-9) keeps its precision instead of collapsing to a few digits or to 0."""
    return {"step": step, **{k: (float(f"{v:.9g}") if isinstance(v, float) else v) for k, v in metrics.items()
                             if k != "step"}}


def format_metrics(step: int, total: int, metrics: dict) -> str:
    """`step 10/100: loss 2.346, grad_norm 0.8123, lr 2.00e-04, tokens_per_s 5321`."""
    return f"step {step}/{total}: " + ", ".join(f"{k} {fmt(k, v)}" for k, v in metrics.items())


class MetricsLogger:
    """Writes on the main process only; other ranks get a logger that does nothing."""

    def __init__(self, output_dir: Path, enabled: bool, total_steps: int, start_step: int, progress_bar: bool):
        self.enabled = enabled
        self.output_dir = output_dir
        self.history: list[dict] = []
        self._tb = None
        self._bar = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(output_dir / "metrics.jsonl", "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run writes steps start_step+1.. again: purge_step hides the earlier run's events from there
            # on (those after its checkpoint), or TensorBoard draws both curves over the same steps
            self._tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"),
                                     purge_step=start_step + 1 if start_step else None)
        except ImportError:  # tensorboard is a dependency, but a broken install should not stop training
            self._tb = None
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {**as_record(step, metrics), "time": round(time.time(), 3)}
        self.history.append(record)
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def progress(self, n: int, postfix: dict) -> None:
        if self._bar is not None:
            self._bar.set_postfix({k: fmt(k, v) for k, v in postfix.items()}, refresh=False)
            self._bar.update(n)

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self, plot: bool) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if plot:
            plot_loss(self.output_dir / "metrics.jsonl", self.output_dir / "loss.png")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss(metrics_file: Path, out: Path) -> Path | None:
    """Train (and eval) loss against step, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_file)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(out)
    return out
