"""Patient-grouped k-fold cross-validation on the corpus' `fold` column, then the final model.

Folds come from the corpus builder: no patient (or near-duplicate image) sits in two folds, unlike the paper's
image-level split. Fold f trains on train+validation rows with fold != f and is evaluated on fold f (its best
checkpoint chosen there, as in a single run). Results of each fold are saved as soon as it ends
(`<output_dir>/fold-<f>/fold_result.json`; with `--resume_from_checkpoint true` finished folds are skipped).

The final model (unless `--no_final`) trains on ALL non-test rows. With no validation data left, two choices come
from the folds instead: the number of epochs (median of the folds' best epochs) and the calibration temperature
(fitted on the pooled out-of-fold logits of the fold models, which saw none of those images).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from train.calibration import fit_temperature
from train.experiment import RunContext, finalize, fit, no_eval_args, prepare_model, run_info
from train.pipeline import CachedSplit
from train.trainer import SCALAR_KEYS, best_epoch, flatten_metrics, predict_logits

logger = logging.getLogger(__name__)
SUMMARY_KEYS = (*SCALAR_KEYS, "ece", "nll")


def summarize(fold_metrics: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation (ddof=1) of each metric over folds."""
    summary = {}
    for key in SUMMARY_KEYS:
        values = [metrics[key] for metrics in fold_metrics if metrics.get(key) is not None]
        if values:
            std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            summary[key] = {"mean": float(np.mean(values)), "std": std, "n": len(values)}
    return summary


def run_fold(ctx: RunContext, pooled: CachedSplit, fold: int, folds: np.ndarray) -> dict[str, Any]:
    """Train on the other folds, evaluate on this one; returns (and saves) metrics and out-of-fold logits."""
    fold_dir = Path(ctx.training_args.output_dir) / f"fold-{fold}"
    result_path = fold_dir / "fold_result.json"
    if result_path.is_file() and ctx.training_args.resume_from_checkpoint:  # resuming: finished folds are kept
        logger.info("fold %d already done (%s): skipped", fold, result_path)
        return json.loads(result_path.read_text())
    train_split = pooled.subset(np.flatnonzero(folds != fold))
    held_out_indices = np.flatnonzero(folds == fold)
    held_out = pooled.subset(held_out_indices)
    args = copy.copy(ctx.training_args)
    args.output_dir = str(fold_dir)
    model, _ = prepare_model(ctx)
    trainer, stats = fit(ctx, model, args, train_split, held_out)
    logits = predict_logits(trainer, held_out)
    metrics = ctx.metric.compute(
        predictions=logits, references=held_out.labels, label_names=ctx.label_names, input_type="logits"
    )
    result = {
        "fold": fold,
        "metrics": flatten_metrics(metrics),
        "confusion_matrix": metrics["confusion_matrix"],
        "best_epoch": best_epoch(
            trainer.state.log_history, args.metric_for_best_model or "loss", args.greater_is_better
        ),
        "stats": stats,
        "indices": held_out_indices.tolist(),
        "logits": logits.tolist(),
        "log_history": trainer.state.log_history,
    }
    if trainer.is_world_process_zero():
        fold_dir.mkdir(parents=True, exist_ok=True)
        tmp = result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(result_path)
        for checkpoint in fold_dir.glob("checkpoint-*"):  # fold models are not shipped; keep only the numbers
            shutil.rmtree(checkpoint, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return result


def cross_validate(ctx: RunContext) -> Path | None:
    """k fold runs, their summary (`<output_dir>/cv_results.json`), then the final model unless --no_final."""
    k = ctx.eval_args.cross_validation
    pooled = CachedSplit.concatenate([ctx.splits["train"], ctx.splits["validation"]])
    folds = np.asarray(pooled.columns["fold"], dtype=np.int64)
    results = [run_fold(ctx, pooled, fold, folds) for fold in range(k)]
    summary = summarize([result["metrics"] for result in results])
    out_of_fold = np.zeros((len(pooled), len(ctx.label_names)))
    for result in results:
        out_of_fold[result["indices"]] = np.asarray(result["logits"])
    cv = {
        "k": k,
        "folds": [
            {key: result[key] for key in ("fold", "metrics", "best_epoch", "confusion_matrix")} for result in results
        ],
        "summary": summary,
    }
    output_dir = Path(ctx.training_args.output_dir)
    if ctx.training_args.process_index == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "cv_results.json").write_text(json.dumps(cv, indent=2))
    for key, values in summary.items():
        logger.info("CV %s: %.4f +- %.4f", key, values["mean"], values["std"])
    if ctx.eval_args.no_final:
        return None

    args = no_eval_args(ctx.training_args, output_dir / "final-training")
    best_epochs = [result["best_epoch"] for result in results if result["best_epoch"] is not None]
    if best_epochs and args.max_steps <= 0:
        args.num_train_epochs = max(1, math.ceil(float(np.median(best_epochs))))
    model, backend = prepare_model(ctx)
    trainer, stats = fit(ctx, model, args, pooled, None)
    test_logits = predict_logits(trainer, ctx.splits["test"])
    temperature, fitted_on = 1.0, "none (calibration off)"
    if ctx.eval_args.calibrate:
        temperature, fitted_on = fit_temperature(out_of_fold, pooled.labels), "out-of-fold cross-validation"
    if not trainer.is_world_process_zero():
        return None
    model = trainer.accelerator.unwrap_model(trainer.model)
    protocol = (
        f"{k}-fold patient-grouped cross-validation, then the final model on all non-test data for "
        f"{args.num_train_epochs:g} epochs (median best epoch of the folds)"
    )
    info = run_info(ctx, model, stats, protocol, args)
    histories = {f"fold {result['fold']}": result["log_history"] for result in results}
    histories["final"] = trainer.state.log_history
    return finalize(ctx, model, backend, temperature, fitted_on, test_logits, histories, info, cv)
