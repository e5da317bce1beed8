"""Train the CNN-LSTM (or its dense-head CNN) with the Hugging Face Trainer; write the report and the Hub folder.

    python train/run.py --config train/configs/paper.json --data_dir ../shared/data/cxr3 --output_dir runs/paper
    python train/run.py --config train/configs/tiny.json --data_dir CORPUS --output_dir /tmp/tiny   # CPU smoke
    torchrun --nproc_per_node 2 train/run.py --config ...    # or: accelerate launch train/run.py --config ...

Flags: every field of ModelArguments, DataArguments, EvaluationArguments (train/training/arguments.py) and
transformers.TrainingArguments; `--config FILE.json` gives defaults that command-line flags override.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import transformers

from train.hub_preflight import PushError
from train.training.arguments import parse_args
from train.training.experiment import run


def main(argv: list[str] | None = None) -> Path | None:
    model_args, data_args, eval_args, training_args = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.should_log else logging.WARNING,
        stream=sys.stderr,
    )
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    try:
        final = run(model_args, data_args, eval_args, training_args)
    except PushError as error:  # one sentence, no traceback: before training (preflight) or after (folder kept)
        sys.exit(f"error: {error}")
    if final is not None:
        logging.getLogger("train.run").info("done: %s", final)
    return final


if __name__ == "__main__":
    main()
