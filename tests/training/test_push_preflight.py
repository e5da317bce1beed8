"""Pushes fail before the work, not after it (train/hub_preflight.py), against the local Hub stand-in.

- Six ways a push cannot succeed (unreachable endpoint, no token, a token the Hub rejects, someone else's namespace,
  an invalid repo id, offline mode) stop `train/run.py --push_to_hub` with one sentence, before any corpus is built
  or image cached; the check itself takes well under the issue's 5 s.
- A push that fails after training (the stand-in refuses uploads) is retried, then ends the run with a non-zero exit
  and a sentence naming the intact folder and the command that pushes it; that command, run against a working
  stand-in, completes the push.

Hub clients read HF_ENDPOINT at import, so everything that talks to the stand-in runs in a subprocess.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.hub_standin import HubStandIn, hub_env

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO_ROOT / "train" / "configs" / "tiny.json"
GOOD_TOKEN = "hf_good-token-for-this-test"
MODEL_ID = "standin-user/cnn-lstm-tiny"


def closed_port_endpoint() -> str:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def case_env(case: str, hub: HubStandIn, tmp_path: Path) -> tuple[dict[str, str], str]:
    """(environment, repo id) of one failure case."""
    env = hub_env(hub.endpoint, tmp_path / "hf-home")
    env["HF_TOKEN"], repo_id = GOOD_TOKEN, MODEL_ID
    if case == "unreachable":
        env["HF_ENDPOINT"] = closed_port_endpoint()
    elif case == "no_token":
        del env["HF_TOKEN"]  # and the fresh HF_HOME holds no stored token
    elif case == "rejected_token":
        env["HF_TOKEN"] = "hf_revoked-token"
    elif case == "other_namespace":
        repo_id = "someone-else/cnn-lstm-tiny"
    elif case == "invalid_repo_id":
        repo_id = "standin-user/not a valid name!"
    elif case == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    return env, repo_id


CASES = {  # case -> what its sentence must say
    "unreachable": ["cannot be reached", "HF_ENDPOINT", "--skip_push_check"],
    "no_token": ["no Hugging Face token", "hf auth login", "HF_TOKEN"],
    "rejected_token": ["rejected the token", "401", "settings/tokens"],
    "other_namespace": [
        "belongs to standin-user",
        "cannot create or write someone-else/cnn-lstm-tiny",
        "standin-user/cnn-lstm-tiny instead",
    ],  # fmt: skip
    "invalid_repo_id": ["not a valid Hub repo id", "not a valid name!"],
    "offline": ["HF_HUB_OFFLINE is set", "unset it"],
}


@pytest.fixture
def strict_hub(tmp_path: Path):
    """A stand-in that knows one valid token, whose user belongs to the org `lab` (write) and `readers` (read)."""
    with HubStandIn(tmp_path / "hub", tokens={GOOD_TOKEN: "standin-user"}, orgs={"lab": "write", "readers": "read"}
                    ) as hub:  # fmt: skip
        yield hub
    assert not hub.errors, hub.errors


@pytest.mark.shared_data
@pytest.mark.parametrize("case", sorted(CASES))
def test_run_stops_before_any_data_is_read(case, strict_hub, cxr3_dir, tmp_path):
    env, repo_id = case_env(case, strict_hub, tmp_path)
    output_dir, cache_dir = tmp_path / "run", tmp_path / "image-cache"
    command = [
        sys.executable, "train/run.py", "--config", str(TINY_CONFIG), "--data_dir", str(cxr3_dir),
        "--output_dir", str(output_dir), "--image_cache_dir", str(cache_dir),
        "--push_to_hub", "--hub_model_id", repo_id,
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --push_to_hub"), proc.stderr[-3000:]
    for words in CASES[case]:
        assert words in last, (case, last)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (output_dir / "corpus").exists(), "the corpus was built before the push check"
    assert not cache_dir.exists(), "images were cached before the push check"
    assert not [path for path in output_dir.rglob("*") if path.is_file()], "the run wrote files before failing"
    assert not strict_hub.store.repos, "a repo was created"


def test_preflight_answers_within_seconds_and_accepts_what_may_write(strict_hub, tmp_path):
    """Each failing check answers in well under 5 s (the issue's bound; measured in the child, without imports),
    and the preflight lets through the user's own namespace and an org where they may write, while a read-only
    token or an org where the user only reads is refused."""
    results = {}
    driver = textwrap.dedent(
        """
        import json, sys, time
        from train.hub_preflight import PushError, check_push_access
        repo_id, repo_type = sys.argv[1], sys.argv[2]
        start = time.monotonic()
        try:
            target = check_push_access(repo_id, repo_type=repo_type)
            answer = {"ok": True, "repo_id": target.repo_id, "user": target.user}
        except PushError as error:
            answer = {"ok": False, "sentence": str(error)}
        answer["seconds"] = time.monotonic() - start
        print(json.dumps(answer))
        """
    )

    def check(env: dict[str, str], repo_id: str, repo_type: str = "model") -> dict:
        proc = subprocess.run([sys.executable, "-c", driver, repo_id, repo_type], env=env, cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    for case in CASES:
        env, repo_id = case_env(case, strict_hub, tmp_path)
        results[case] = check(env, repo_id)
        assert not results[case]["ok"], (case, results[case])
        assert results[case]["seconds"] < 5.0, (case, results[case])
    env, _ = case_env("good", strict_hub, tmp_path)
    good = check(env, MODEL_ID)
    assert good["ok"] and good["user"] == "standin-user" and good["repo_id"] == MODEL_ID, good
    assert check(env, "lab/cnn-lstm")["ok"]
    assert check(env, "standin-user/cxr_metrics", "space")["ok"]
    readers = check(env, "readers/cnn-lstm")
    assert not readers["ok"] and "member of readers with role 'read'" in readers["sentence"], readers
    strict_hub.token_role = "read"
    read_only = check(env, MODEL_ID)
    assert not read_only["ok"] and "read-only" in read_only["sentence"], read_only
    print({case: round(result["seconds"], 3) for case, result in results.items()})


@pytest.mark.slow
@pytest.mark.shared_data
def test_push_that_fails_after_training_loses_nothing(tiny_corpus, tmp_path):
    with HubStandIn(tmp_path / "hub") as hub:
        env = hub_env(hub.endpoint, tmp_path / "hf-home")
        output_dir = tmp_path / "run"
        hub.refuse_writes = 503  # the Hub goes down while the run trains (the preflight passed before)
        command = [
            sys.executable, "train/run.py", "--config", str(TINY_CONFIG), "--data_dir", str(tiny_corpus),
            "--output_dir", str(output_dir), "--bootstrap_samples", "20", "--push_to_hub", "--hub_model_id", MODEL_ID,
            "--push_attempts", "2",
        ]  # fmt: skip
        # the preflight only reads (whoami), so it passes although writes are refused
        proc = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 1, proc.stderr[-4000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
        final = output_dir / "final"
        assert f"the model folder {final} is intact" in last, last
        assert "after 2 attempts (HTTP 503" in last, last
        assert hub.refused >= 2, "the transient failure was not retried"
        assert not hub.repo_exists(MODEL_ID)
        for name in ("config.json", "README.md", "preprocessor_config.json", "report/metrics.json"):
            assert (final / name).is_file(), name
        retry = re.search(r"push it later with `([^`]+)`", last).group(1)
        assert retry == f"python scripts/push_model.py --model_dir {final} --hub_model_id {MODEL_ID}", retry

        hub.refuse_writes = None  # the Hub is back: the printed command completes the push
        words = shlex.split(retry)
        proc = subprocess.run([sys.executable, *words[1:]], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        local = sorted(str(path.relative_to(final)) for path in final.rglob("*") if path.is_file())
        assert set(local) <= set(hub.list_files(MODEL_ID)), set(local) - set(hub.list_files(MODEL_ID))
        for name in local:
            assert hub.read_file(MODEL_ID, name) == (final / name).read_bytes(), name
        assert not hub.unknown_requests, hub.unknown_requests
