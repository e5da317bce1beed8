"""Patient-grouped k-fold cross-validation on the corpus' `fold` column (k >= 3), then the final model.

Folds come from the corpus builder: no patient (or near-duplicate image) sits in two folds, unlike the paper's
image-level split. The train+validation rows are pooled and, for each scored fold f:

- fold s = (f + 1) % k is the inner validation ("selection") fold: the checkpoint is chosen on it
  (`load_best_model_at_end` on `metric_for_best_model`), early stopping watches it, and the fold's calibration
  temperature is fitted on its logits;
- the model trains on the remaining k - 2 folds;
- the fold's metrics are computed on fold f only, with the temperature from fold s applied. Fold f's images are
  never used for training, checkpoint choice, early stopping or calibration of that fold's model.

Results of each fold are saved as soon as it ends (`<output_dir>/fold-<f>/fold_result.json`, with the folds each
split used; with `--resume_from_checkpoint true` finished folds of this protocol are skipped).

The final model (unless `--no_final`) trains on ALL non-test rows. With no validation data left, two choices come
from the folds instead: the number of epochs (median of the folds' best epochs on their inner validation folds) and
the calibration temperature (fitted on the pooled out-of-fold logits of the fold models: each row scored by the
model that neither trained on nor was selected on it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from cxr_common.atomic import atomic_write_text
from train.training.calibration import fit_temperature
from train.training.context import RunContext
from train.training.input_pipeline import CachedSplit
from train.training.model_card import run_info
from train.training.steps import finalize, fit, no_eval_args, prepare_model
from train.training.trainer import SCALAR_KEYS, best_epoch, flatten_metrics, predict_logits

logger = logging.getLogger(__name__)
SUMMARY_KEYS = (*SCALAR_KEYS, "ece", "nll")
CV_PROTOCOL = (
    "scored fold f: trained on the other k - 2 folds; checkpoint, early stopping and temperature chosen on the "
    "inner validation fold (f + 1) mod k; metrics on fold f only"
)


def summarize(fold_metrics: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation (ddof=1) of each metric over folds."""
    summary = {}
    for key in SUMMARY_KEYS:
        values = [metrics[key] for metrics in fold_metrics if metrics.get(key) is not None]
        if values:
            std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            summary[key] = {"mean": float(np.mean(values)), "std": std, "n": len(values)}
    return summary


def fold_roles(folds: np.ndarray, fold: int, k: int) -> dict[str, np.ndarray]:
    """Row indices of the pooled data per role for scored fold `fold`: train (k - 2 folds), selection, scored."""
    if k < 3:
        raise ValueError(f"cross-validation with an inner selection fold needs k >= 3 folds, got {k}")
    selection = (fold + 1) % k
    return {
        "train": np.flatnonzero((folds != fold) & (folds != selection)),
        "selection": np.flatnonzero(folds == selection),
        "scored": np.flatnonzero(folds == fold),
    }


def run_fold(ctx: RunContext, pooled: CachedSplit, fold: int, folds: np.ndarray, k: int) -> dict[str, Any]:
    """Train on k - 2 folds, select/stop/calibrate on fold (fold + 1) % k, score on `fold`; returns (and saves) the
    fold's metrics and its raw out-of-fold logits."""
    fold_dir = Path(ctx.training_args.output_dir) / f"fold-{fold}"
    result_path = fold_dir / "fold_result.json"
    if result_path.is_file() and ctx.training_args.resume_from_checkpoint:  # resuming: finished folds are kept
        saved = json.loads(result_path.read_text())
        if saved.get("selection_fold") == (fold + 1) % k:
            logger.info("fold %d already done (%s): skipped", fold, result_path)
            return saved
        logger.info("fold %d: %s predates the inner-selection protocol; rerunning", fold, result_path)
    roles = fold_roles(folds, fold, k)
    train_split, selection, scored = (pooled.subset(roles[name]) for name in ("train", "selection", "scored"))
    args = dataclasses.replace(ctx.training_args, output_dir=str(fold_dir))
    model = prepare_model(ctx)
    trainer, stats = fit(ctx, model, args, train_split, selection, stage=f"fold {fold}")  # selection: checkpoint, stop
    temperature = 1.0
    if ctx.eval_args.calibrate:
        temperature = fit_temperature(predict_logits(trainer, selection), selection.labels)
    logits = predict_logits(trainer, scored)  # raw (T = 1); the fold's metrics use its own temperature
    metrics = ctx.metric.compute(
        predictions=logits / temperature, references=scored.labels, label_names=ctx.label_names, input_type="logits"
    )
    result = {
        "fold": fold,
        "selection_fold": (fold + 1) % k,
        "training_folds": sorted({int(value) for value in folds[roles["train"]]}),
        "temperature": float(temperature),
        "metrics": flatten_metrics(metrics),
        "confusion_matrix": metrics["confusion_matrix"],
        "best_epoch": best_epoch(  # on the selection fold: the final model's epoch count comes from these
            trainer.state.log_history, args.metric_for_best_model or "loss", args.greater_is_better
        ),
        "stats": stats,
        "indices": roles["scored"].tolist(),
        "logits": logits.tolist(),
        "log_history": trainer.state.log_history,
    }
    if trainer.is_world_process_zero():
        atomic_write_text(result_path, json.dumps(result))
        for checkpoint in fold_dir.glob("checkpoint-*"):  # fold models are not shipped; keep only the numbers
            shutil.rmtree(checkpoint, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return result


def cross_validate(ctx: RunContext) -> Path | None:
    """k fold runs, their summary (`<output_dir>/cv_results.json`), then the final model unless --no_final."""
    k = ctx.eval_args.cross_validation
    pooled = CachedSplit.concatenate([ctx.splits["train"], ctx.splits["validation"]])
    folds = np.asarray(pooled.columns["fold"], dtype=np.int64)
    results = [run_fold(ctx, pooled, fold, folds, k) for fold in range(k)]
    summary = summarize([result["metrics"] for result in results])
    out_of_fold = np.zeros((len(pooled), len(ctx.label_names)))
    for result in results:
        out_of_fold[result["indices"]] = np.asarray(result["logits"])
    cv = {
        "k": k,
        "folds": [
            {
                key: result.get(key)
                for key in (
                    "fold",
                    "selection_fold",
                    "training_folds",
                    "temperature",
                    "metrics",
                    "best_epoch",
                    "confusion_matrix",
                )
            }
            for result in results
        ],
        "protocol": CV_PROTOCOL,
        "summary": summary,
    }
    output_dir = Path(ctx.training_args.output_dir)
    if ctx.training_args.process_index == 0:
        atomic_write_text(output_dir / "cv_results.json", json.dumps(cv, indent=2))
    for key, values in summary.items():
        logger.info("CV %s: %.4f +- %.4f", key, values["mean"], values["std"])
    if ctx.eval_args.no_final:
        return None

    args = no_eval_args(ctx.training_args, output_dir / "final-training")
    best_epochs = [result["best_epoch"] for result in results if result["best_epoch"] is not None]
    if best_epochs and args.max_steps <= 0:
        args = dataclasses.replace(args, num_train_epochs=max(1, math.ceil(float(np.median(best_epochs)))))
    model = prepare_model(ctx)
    trainer, stats = fit(ctx, model, args, pooled, None, stage="final model (all non-test data)")
    test_logits = predict_logits(trainer, ctx.splits["test"])
    temperature, fitted_on = 1.0, "none (calibration off)"
    if ctx.eval_args.calibrate:
        temperature, fitted_on = fit_temperature(out_of_fold, pooled.labels), "out-of-fold cross-validation"
    if not trainer.is_world_process_zero():
        return None
    model = trainer.accelerator.unwrap_model(trainer.model)
    protocol = (
        f"{k}-fold patient-grouped cross-validation (each fold scored by a model trained on k - 2 folds and "
        f"selected on the next fold), then the final model on all non-test data for {args.num_train_epochs:g} "
        "epochs (median of the folds' best epochs on their inner validation folds)"
    )
    info = run_info(ctx, model, stats, protocol, args)
    histories = {f"fold {result['fold']}": result["log_history"] for result in results}
    histories["final"] = trainer.state.log_history
    return finalize(ctx, model, temperature, fitted_on, test_logits, histories, info, cv)
