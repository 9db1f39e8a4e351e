"""What a run tells: metrics.jsonl (one JSON object per log or eval), loss.png, and the console lines."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from lmforge.errors import LMForgeError
from lmforge.files import write_text_atomic


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run dir's metrics.jsonl in order ([] if there is none); a line cut short by a crash is
    skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLog:
    # loss.png is for a person watching the run: refreshing it at every evaluation (a tenth of a second or more of
    # matplotlib each time) would take that time from the run; during a run it is redrawn at most this often.
    PLOT_INTERVAL = 30.0

    def __init__(self, run_dir: Path, resume_step: int | None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.records: list[dict] = []
        self.last_plot = time.monotonic()
        if self.path.exists():
            # Records past the checkpoint we resume from describe steps that will be redone.
            kept = [] if resume_step is None else read_metrics(run_dir)
            self.records = [r for r in kept if r.get("step", 0) <= resume_step]
            self._rewrite()

    def _rewrite(self) -> None:
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def plot_now_and_then(self) -> None:
        """Redraw loss.png if the last drawing is PLOT_INTERVAL seconds old."""
        if time.monotonic() - self.last_plot >= self.PLOT_INTERVAL:
            self.plot()

    def plot(self, path: Path | None = None) -> Path:
        """Train and val loss against step, as loss.png, written atomically."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = path or self.path.with_name("loss.png")
        train = [(r["step"], r["loss"]) for r in self.records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.records if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        if train:
            ax.plot(*zip(*train), label="train", linewidth=1)
        if val:
            ax.plot(*zip(*val), "o-", label="val", linewidth=1.5, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.subplots_adjust(left=0.1, right=0.98, top=0.97, bottom=0.12)  # fixed: tight_layout costs 0.1 s
        tmp = path.with_name(".loss.tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, path)
        self.last_plot = time.monotonic()
        return path


class Loggers:
    """Optional TensorBoard and Weights & Biases sinks for the same records as metrics.jsonl."""

    def __init__(self, run_dir: Path, names: str, config: dict):
        self.tensorboard = self.wandb = None
        wanted = {n.strip() for n in names.split(",") if n.strip()}
        if "tensorboard" in wanted:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise LMForgeError(
                    "--train.log tensorboard needs the tensorboard package: pip install tensorboard"
                ) from exc
            self.tensorboard = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if "wandb" in wanted:
            try:
                import wandb
            except ImportError as exc:
                raise LMForgeError("--train.log wandb needs the wandb package: pip install wandb") from exc
            self.wandb = wandb.init(project="lmforge", dir=str(run_dir), name=Path(run_dir).name, config=config)

    def write(self, record: dict) -> None:
        step = record.get("step", 0)
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
