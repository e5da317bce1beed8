"""Push a saved model folder (and/or the metric module) to the Hugging Face Hub: the retry command that a training
run prints when its push fails, and the way to publish a folder trained earlier.

    python scripts/push_model.py --model_dir runs/x/final --hub_model_id USER/cnn-lstm-cxr3
    python scripts/push_model.py --push_metric_to_hub USER/cxr_metrics
    python scripts/push_model.py --model_dir checkpoints/cnn-lstm-cxr3 --hub_model_id USER/cnn-lstm-cxr3 --private

The folder is the run's `final/`, exactly a Hub model repo (weights, config, remote code, card, report/); it is
uploaded in one commit, as `train/run.py --push_to_hub` does. The same preflight runs first (train/hub_preflight.py:
offline mode, endpoint, token, repo id, write access), and transient errors are retried with backoff. Credentials:
--hub_token, else HF_TOKEN or `hf auth login`. `hf upload USER/NAME runs/x/final .` uploads the same files, without
the checks.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from train.hub_preflight import PushError, check_push_access
from train.training.hub_folder import publish

REQUIRED_FILES = ("config.json", "README.md", "preprocessor_config.json")


@dataclass
class PushModelArguments:
    model_dir: str | None = field(default=None, metadata={"help": "The saved model folder (a run's final/)."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub model repo id (OWNER/NAME)."})
    push_metric_to_hub: str | None = field(
        default=None, metadata={"help": "Also (or only) publish train/metrics/cxr_metrics as this Space id."}
    )
    private: bool = field(default=False, metadata={"help": "Create the model repo as private (if it is new)."})
    hub_token: str | None = field(default=None, metadata={"help": "Token (default: HF_TOKEN or `hf auth login`)."})
    push_attempts: int = field(default=4, metadata={"help": "Tries per push on transient errors."})


def check_model_dir(folder: Path) -> None:
    if not folder.is_dir():
        raise PushError(f"--model_dir {folder} does not exist.")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise PushError(f"--model_dir {folder} is not a saved model folder: {', '.join(missing)} missing.")


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(PushModelArguments).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        if (args.model_dir is None) != (args.hub_model_id is None):
            raise PushError("--model_dir and --hub_model_id go together.")
        if args.model_dir is None and args.push_metric_to_hub is None:
            raise PushError("nothing to push: give --model_dir and --hub_model_id, or --push_metric_to_hub.")
        folder = Path(args.model_dir) if args.model_dir else None
        if folder is not None:
            check_model_dir(folder)
            check_push_access(args.hub_model_id, token=args.hub_token, flag="push_model.py")
        if args.push_metric_to_hub:
            check_push_access(args.push_metric_to_hub, repo_type="space", token=args.hub_token, flag="push_model.py")
        publish(
            folder,
            hub_model_id=args.hub_model_id,
            private=args.private,
            metric_id=args.push_metric_to_hub,
            token=args.hub_token,
            token_given=args.hub_token is not None,
            attempts=args.push_attempts,
        )
    except PushError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    pushed = [name for name in (args.hub_model_id, args.push_metric_to_hub) if name]
    print(f"pushed: {', '.join(pushed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
