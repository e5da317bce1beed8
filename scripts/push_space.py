"""Assemble the Gradio Space folder and upload it to the Hugging Face Hub.

    python scripts/push_space.py --space_id USER/cnn-lstm-cxr                  # assemble + create + upload
    python scripts/push_space.py --space_id USER/cnn-lstm-cxr --checkpoint runs/paper/final
    python scripts/push_space.py --output_dir /tmp/space --dry_run             # assemble only, to inspect

The Space holds exactly what the app needs: app.py, the modeling_cnn_lstm package (the model), the cxr_app package
(the app) and the cxr_common package it shares with training, the example X-rays with their credits, the checkpoint
folder if there is one (as checkpoints/cnn-lstm-cxr3, which the app serves by default), space/README.md (Space
metadata) as README.md and space/requirements.txt. Without a checkpoint the Space starts and says that no trained
model is installed (or set the Space variable CNN_LSTM_MODEL).

`--output_dir` is written atomically (cxr_common/atomic.py): a failed assembly leaves it as it was, and an existing
non-empty folder is refused, dry run or not, unless `--overwrite`.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cxr_common.atomic import DestinationExists, atomic_folder, check_destination
from train.hub_preflight import PushError, check_push_access, push_with_retries

REPO_ROOT = Path(__file__).resolve().parents[1]
SPACE_CHECKPOINT = Path("checkpoints") / "cnn-lstm-cxr3"
CHECKPOINT_FILES = ("*.json", "*.safetensors", "*.py", "*.md", "*.txt")  # config, weights, remote code, card
REPORT_FILES = ("*.json", "*.md", "*.csv", "*.png")  # report/: the app's "Model report" tab and predictive values


@dataclass
class PushSpaceArguments:
    space_id: str | None = field(default=None, metadata={"help": "Hub Space id (owner/name); needed unless dry_run."})
    checkpoint: str = field(
        default=str(REPO_ROOT / SPACE_CHECKPOINT),
        metadata={"help": "Checkpoint folder to ship (skipped with a note when it does not exist)."},
    )
    output_dir: str | None = field(default=None, metadata={"help": "Assemble here (default: a temporary folder)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace --output_dir if it exists and is not empty."})
    private: bool = field(default=False, metadata={"help": "Create the Space as private."})
    commit_message: str = field(default="Update the CNN-LSTM chest X-ray demo", metadata={"help": "Commit title."})
    dry_run: bool = field(default=False, metadata={"help": "Assemble only; do not contact the Hub."})
    skip_push_check: bool = field(
        default=False, metadata={"help": "Do not ask the Hub first whether the push can succeed (hub_preflight)."}
    )
    push_attempts: int = field(default=4, metadata={"help": "Tries of the upload on transient errors."})


def _copy_files(source: Path, destination: Path, patterns: tuple[str, ...]) -> list[Path]:
    destination.mkdir(parents=True, exist_ok=True)
    copied = []
    for pattern in patterns:
        for path in sorted(source.glob(pattern)):
            if path.is_file() and not path.name.startswith("."):
                shutil.copy2(path, destination / path.name)
                copied.append(destination / path.name)
    return copied


def assemble_space(destination: Path, checkpoint: Path | None) -> list[str]:
    """Copy the Space's files into the empty or new folder `destination`; returns their paths relative to it."""
    destination.mkdir(parents=True, exist_ok=True)
    if any(destination.iterdir()):
        raise FileExistsError(f"{destination} is not empty")
    shutil.copy2(REPO_ROOT / "app.py", destination / "app.py")
    shutil.copy2(REPO_ROOT / "space" / "README.md", destination / "README.md")
    shutil.copy2(REPO_ROOT / "space" / "requirements.txt", destination / "requirements.txt")
    _copy_files(REPO_ROOT / "modeling_cnn_lstm", destination / "modeling_cnn_lstm", ("*.py",))
    _copy_files(REPO_ROOT / "cxr_app", destination / "cxr_app", ("*.py",))
    _copy_files(REPO_ROOT / "cxr_common", destination / "cxr_common", ("*.py",))  # the layer the app shares
    _copy_files(REPO_ROOT / "examples", destination / "examples", ("*.jpg", "*.png", "*.dcm", "CREDITS.md"))
    if checkpoint is not None:
        if not (checkpoint / "config.json").is_file():
            raise SystemExit(f"{checkpoint} is not a checkpoint folder (no config.json)")
        _copy_files(checkpoint, destination / SPACE_CHECKPOINT, CHECKPOINT_FILES)
        if (checkpoint / "report").is_dir():
            _copy_files(checkpoint / "report", destination / SPACE_CHECKPOINT / "report", REPORT_FILES)
    return sorted(str(path.relative_to(destination)) for path in destination.rglob("*") if path.is_file())


def push_space(folder: Path, space_id: str, private: bool, commit_message: str, attempts: int = 4) -> str:
    """Create the Space if needed (sdk gradio) and upload the folder as one commit, retried on transient errors;
    returns the commit URL, or raises PushError."""
    from huggingface_hub import HfApi

    def push() -> str:
        api = HfApi()
        api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=space_id, repo_type="space", folder_path=folder, commit_message=commit_message
        )
        return info.commit_url

    return push_with_retries(push, f"the Space {space_id}", attempts=attempts)


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(PushSpaceArguments).parse_args_into_dataclasses(args=argv)
    if args.space_id is None and not args.dry_run:
        print("--space_id is required (or --dry_run to only assemble)", file=sys.stderr)
        return 2
    if args.output_dir:
        try:
            check_destination(args.output_dir, args.overwrite)  # before anything is copied or deleted
        except DestinationExists as error:
            print(f"error: --output_dir {error}", file=sys.stderr)
            return 2
    if not args.dry_run and not args.skip_push_check:
        try:  # before anything is assembled: a push that cannot succeed stops here, with its cause and fix
            check_push_access(args.space_id, repo_type="space", flag="push_space.py")
        except PushError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir():
        print(f"note: no checkpoint at {checkpoint}; the Space will say that no trained model is installed")
        checkpoint = None
    with tempfile.TemporaryDirectory(prefix="cnn-lstm-space-") as tmp:
        folder = Path(args.output_dir) if args.output_dir else Path(tmp) / "space"
        try:
            with atomic_folder(folder, overwrite=args.overwrite) as staging:
                files = assemble_space(staging, checkpoint)
        except DestinationExists as error:
            print(f"error: --output_dir {error}", file=sys.stderr)
            return 2
        print(f"assembled {len(files)} files in {folder}")
        if args.dry_run:
            print("\n".join(files))
            return 0
        try:
            url = push_space(folder, args.space_id, args.private, args.commit_message, args.push_attempts)
        except PushError as error:
            kept = f"the assembled folder {folder} is intact; " if args.output_dir else ""
            again = "push it later with the same command" + (" plus --overwrite" if args.output_dir else "")
            print(f"error: {error}; {kept}{again} (assembling takes seconds).", file=sys.stderr)
            return 1
        print(f"pushed: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
