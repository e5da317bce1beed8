"""One line per epoch in `<output_dir>/training_log.txt`: what someone checking on a run of several hours wants.

    2026-12-01 20:41:07 224px epoch 3/8 | train loss 0.6211 | val macro-F1 0.7412 (selection 0.7020) | 1.31 img/s
        | elapsed 0:24:31 | ETA 0:41:10

The file is appended to (a resumed run continues it) and flushed after every line. Images/s counts training images
per second of wall time since the previous line (evaluation included: it is what the ETA needs). The ETA is this
stage's remaining epochs at this process's mean epoch time, plus `later_seconds(epoch_seconds)` for the stages still
to come (progressive resizing: the 224 px stage, estimated from the low-resolution epoch time).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import IntervalStrategy

LOG_NAME = "training_log.txt"


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class EpochLogCallback(TrainerCallback):
    """Writes the per-epoch line at each evaluation (main process only)."""

    def __init__(
        self,
        path: str | Path,
        stage: str,
        num_train_images: int,
        selection_metric: str | None = None,
        later_seconds: Callable[[float], float] | None = None,
    ) -> None:
        self.path = Path(path)
        self.stage = stage
        self.num_train_images = num_train_images
        self.selection_metric = selection_metric
        self.later_seconds = later_seconds
        self.started = self.previous_time = None
        self.previous_epoch = 0.0
        self.epoch_seconds: list[float] = []
        self.last_loss: float | None = None

    def write(self, line: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()

    def on_train_begin(self, args, state, control, **kwargs: Any) -> None:
        self.started = self.previous_time = time.time()
        self.previous_epoch = float(state.epoch or 0.0)
        if state.is_world_process_zero:
            action = f"resumed at epoch {self.previous_epoch:g}" if self.previous_epoch else "started"
            self.write(f"{self._now()} {self.stage} {action}: {args.num_train_epochs:g} epochs")

    def on_log(self, args, state, control, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.last_loss = float(logs["loss"])

    def on_evaluate(self, args, state, control, metrics: dict[str, float] | None = None, **kwargs: Any) -> None:
        if metrics is not None:
            self._write_epoch(args, state, metrics)

    def on_epoch_end(self, args, state, control, **kwargs: Any) -> None:
        if args.eval_strategy == IntervalStrategy.NO:  # no validation data (CV final model): a line per epoch anyway
            self._write_epoch(args, state, {})

    def _write_epoch(self, args, state, metrics: dict[str, float]) -> None:
        if not state.is_world_process_zero or self.previous_time is None:
            return
        now, epoch = time.time(), float(state.epoch or 0.0)
        epochs_done = max(epoch - self.previous_epoch, 1e-9)
        seconds = now - self.previous_time
        self.epoch_seconds.append(seconds / epochs_done)
        self.previous_time, self.previous_epoch = now, epoch
        mean_epoch = sum(self.epoch_seconds) / len(self.epoch_seconds)
        remaining = max(args.num_train_epochs - epoch, 0.0) * mean_epoch
        if self.later_seconds is not None:
            remaining += self.later_seconds(mean_epoch)
        f1 = metrics.get("eval_macro_f1")
        parts = [
            f"{self._now()} {self.stage} epoch {epoch:g}/{args.num_train_epochs:g}",
            f"train loss {self.last_loss:.4f}" if self.last_loss is not None else "train loss n/a",
            f"val macro-F1 {f1:.4f}" if f1 is not None else "val macro-F1 n/a (no validation data)",
        ]
        key = f"eval_{self.selection_metric}" if self.selection_metric else None
        if key and key != "eval_macro_f1" and key in metrics:
            parts[-1] += f" (selection {metrics[key]:.4f})"
        parts += [
            f"{self.num_train_images * epochs_done / seconds:.2f} img/s",
            f"elapsed {_clock(now - self.started)}",
            f"ETA {_clock(remaining)}",
        ]
        self.write(" | ".join(parts))

    @staticmethod
    def _now() -> str:
        return datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
