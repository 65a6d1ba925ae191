"""What a run reports: `metrics.jsonl` (always, process 0), tensorboard / wandb where asked
and installed, and the throughput of the logged rows."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from ._config import TrainConfig

# The step's metrics that a row records, where the objective has them: the controlnet
# objective has no consistency / regulariser terms and no guidance scale
# (`distill.metric_names`).
_ROW_METRICS = ("loss", "loss_consistency", "loss_regularizer", "grad_norm", "lr", "timestep",
                "guidance_scale")


def note(message: str) -> None:
    """A line for the user, on stderr."""
    print(message, file=sys.stderr, flush=True)


class Metrics:
    """`metrics.jsonl` (always, process 0) and tensorboard / wandb where asked and installed.

    On resume (`resume_step` given) the rows after the resumed step are dropped, so that the
    file reads as one uninterrupted run."""

    def __init__(self, config: TrainConfig, output_dir: Path, resume_step: int | None,
                 main: bool):
        self.main = main
        self.path = output_dir / "metrics.jsonl"
        self.writers: list = []
        if not main:
            return
        rows = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if int(row.get("step", 0)) <= resume_step:
                    rows.append(line)
        self.path.write_text("".join(line + "\n" for line in rows))
        self.file = open(self.path, "a")  # noqa: SIM115 - open for the run, closed by close()
        wanted = {"all": ("tensorboard", "wandb")}.get(config.report_to or "none",
                                                      (config.report_to,))
        if "tensorboard" in wanted:
            self._open_tensorboard(output_dir)
        if "wandb" in wanted:
            self._open_wandb(config, output_dir)

    def _open_tensorboard(self, output_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                SummaryWriter = None
        if SummaryWriter is None:
            note("note: report_to tensorboard: tensorboard is not installed "
                 "(pip install tensorboardX); metrics go to metrics.jsonl only")
        else:
            self.writers.append(("tensorboard", SummaryWriter(str(output_dir / "logs"))))

    def _open_wandb(self, config: TrainConfig, output_dir: Path) -> None:
        try:
            import wandb
        except ImportError:
            note("note: report_to wandb: wandb is not installed; metrics go to "
                 "metrics.jsonl only")
        else:
            run = wandb.init(project="codi-eqx", config=config.to_dict(), dir=str(output_dir),
                             resume="allow")
            self.writers.append(("wandb", run))

    def log(self, row: dict) -> None:
        if not self.main:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for kind, w in self.writers:
            if kind == "tensorboard":
                for k, v in row.items():
                    if k != "step" and isinstance(v, (int, float)):
                        w.add_scalar(f"train/{k}", v, row["step"])
            else:
                w.log(row, step=row["step"])

    def log_images(self, name: str, grid: np.ndarray, step: int) -> None:
        for kind, w in self.writers:
            if kind == "tensorboard":
                w.add_image(name, grid, step, dataformats="HWC")
            else:
                import wandb

                w.log({name: wandb.Image(grid)}, step=step)

    def close(self) -> None:
        if not self.main:
            return
        self.file.close()
        for kind, w in self.writers:
            w.close() if kind == "tensorboard" else w.finish()


class Throughput:
    """Examples per second: of the last step (for the progress bar) and averaged over the
    steps since the last logged row (for `metrics.jsonl`)."""

    def __init__(self, global_batch_size: int):
        self.batch = global_batch_size
        self._t = time.perf_counter()
        self._steps, self._seconds = 0, 0.0
        self.last = 0.0

    def tick(self) -> None:
        """One step done."""
        now = time.perf_counter()
        dt, self._t = now - self._t, now
        self._steps, self._seconds = self._steps + 1, self._seconds + dt
        self.last = self.batch / dt

    def window(self) -> float:
        """Examples per second since the last call (or the start)."""
        eps = self.batch * self._steps / self._seconds
        self._steps, self._seconds = 0, 0.0
        return eps


def metrics_row(step: int, epoch: int, metrics: dict, examples_per_sec: float,
                skipped_images: int) -> dict:
    """One `metrics.jsonl` row."""
    return {"step": step, "epoch": epoch,
            **{k: metrics[k] for k in _ROW_METRICS if k in metrics},
            "examples_per_sec": examples_per_sec, "skipped_images": skipped_images}
