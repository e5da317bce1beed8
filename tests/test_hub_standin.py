"""The Hub stand-in against the real clients: push, then pull back, each client in a subprocess.

A subprocess per test because `huggingface_hub`, `transformers` and `datasets` read `HF_ENDPOINT` and the offline
switches at import, and this test process already imported them offline (tests/conftest.py).
"""

import hashlib
import http.client
import json
import textwrap
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.hub_standin import HubStandIn, hub_env, run_python

USER = "standin-user"


def _run(hub: HubStandIn, tmp_path: Path, code: str) -> str:
    """Run client code against `hub`; the stand-in must have understood every request it got."""
    out = run_python(textwrap.dedent(code), hub_env(hub.endpoint, tmp_path / "hf-home"), cwd=tmp_path)
    assert hub.unknown_requests == [], f"requests the stand-in does not serve: {hub.unknown_requests}"
    return out


def test_errors_are_hub_shaped(hub_standin: HubStandIn) -> None:
    """Missing repos, revisions and files carry the X-Error-Code the client turns into its exceptions."""
    hub_standin.store.create_repo("model", f"{USER}/m", private=False, sdk=None)

    def status(path: str, method: str = "HEAD") -> tuple[int, str | None, str | None]:
        request = urllib.request.Request(hub_standin.endpoint + path, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, None, response.headers.get("X-Repo-Commit")
        except urllib.error.HTTPError as err:
            return err.code, err.headers.get("X-Error-Code"), err.headers.get("X-Repo-Commit")

    head = hub_standin.commits(f"{USER}/m")[0]["id"]
    assert status(f"/{USER}/m/resolve/main/.gitattributes") == (200, None, head)
    assert status(f"/{USER}/m/resolve/main/missing.json") == (404, "EntryNotFound", head)
    assert status(f"/{USER}/m/resolve/nobranch/config.json")[:2] == (404, "RevisionNotFound")
    assert status(f"/{USER}/nope/resolve/main/config.json")[:2] == (404, "RepoNotFound")
    assert status("/api/models-tags-by-type", "GET")[:2] == (404, None)
    assert hub_standin.unknown_requests == [("GET", "/api/models-tags-by-type")]
    assert status("/api/whoami-v2", "GET")[0] == 401  # no token, no identity


def test_ranges_chunked_uploads_and_persistence(tmp_path: Path) -> None:
    """Byte ranges (HfFileSystem reads with them), chunked PUTs to the LFS href, repos surviving a restart."""
    with HubStandIn(tmp_path / "hub") as hub:
        hub.store.create_repo("dataset", f"{USER}/d", private=False, sdk=None)
        content = bytes(range(200))
        oid = hashlib.sha256(content).hexdigest()
        host, port = urllib.parse.urlsplit(hub.endpoint).netloc.split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        connection.request("PUT", f"/_standin/lfs/{oid}", body=iter([content[:50], content[50:]]))  # chunked
        assert connection.getresponse().read() == b"" and hub.store.has_blob(oid)
        line = {"key": "lfsFile", "value": {"path": "x.parquet", "algo": "sha256", "oid": oid, "size": 200}}
        hub.store.commit(
            "dataset", f"{USER}/d", "main", [{"key": "header", "value": {"summary": "s"}}, line], False, USER
        )

        def fetch(byte_range: str) -> tuple[int, bytes, str | None]:
            request = urllib.request.Request(hub.resolve_url(f"{USER}/d", "x.parquet", "dataset"))
            request.add_header("Range", byte_range)
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status, response.read(), response.headers.get("Content-Range")
            except urllib.error.HTTPError as err:
                return err.code, b"", err.headers.get("Content-Range")

        assert fetch("bytes=10-19") == (206, content[10:20], "bytes 10-19/200")
        assert fetch("bytes=190-") == (206, content[190:], "bytes 190-199/200")
        assert fetch("bytes=-5") == (206, content[-5:], "bytes 195-199/200")
        assert fetch("bytes=500-") == (416, b"", "bytes */200")
        head = hub.commits(f"{USER}/d", "dataset")[0]["id"]
    with HubStandIn(tmp_path / "hub") as again:
        assert again.commits(f"{USER}/d", "dataset")[0]["id"] == head
        assert again.read_file(f"{USER}/d", "x.parquet", "dataset") == content
        assert again.file_info(f"{USER}/d", "x.parquet", "dataset")["lfs"]


def test_model_push_to_hub_then_from_pretrained(hub_standin: HubStandIn, tmp_path: Path) -> None:
    out = _run(
        hub_standin,
        tmp_path,
        f"""
        import torch
        from transformers import ResNetConfig, ResNetForImageClassification

        torch.manual_seed(0)
        config = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
        model = ResNetForImageClassification(config).eval()
        info = model.push_to_hub("{USER}/tiny-resnet", commit_message="tiny resnet")
        print("COMMIT", info.oid)
        loaded = ResNetForImageClassification.from_pretrained("{USER}/tiny-resnet").eval()
        ours, theirs = model.state_dict(), loaded.state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), "weights differ after the round trip"
        assert loaded.config.hidden_sizes == [8, 16]
        """,
    )
    repo = f"{USER}/tiny-resnet"
    assert f"COMMIT {hub_standin.commits(repo)[0]['id']}" in out
    assert hub_standin.commits(repo)[0]["title"] == "tiny resnet"
    assert {"config.json", "model.safetensors", "README.md", ".gitattributes"} <= set(hub_standin.list_files(repo))
    assert hub_standin.file_info(repo, "model.safetensors")["lfs"]  # weights took the git-LFS path
    assert json.loads(hub_standin.read_file(repo, "config.json"))["hidden_sizes"] == [8, 16]


def test_upload_folder_then_snapshot_download(hub_standin: HubStandIn, tmp_path: Path) -> None:
    folder = tmp_path / "to-upload"
    (folder / "nested").mkdir(parents=True)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- chest-x-ray\n---\n\n# A card\n")
    (folder / "nested" / "notes.txt").write_text("second level\n")
    (folder / "weights.bin").write_bytes(bytes(range(256)) * 4)
    _run(
        hub_standin,
        tmp_path,
        f"""
        from pathlib import Path
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download
        from huggingface_hub.errors import EntryNotFoundError

        api = HfApi()
        repo = api.create_repo("upload-me").repo_id
        assert repo == "{USER}/upload-me", repo
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path="{folder}", repo_id=repo, commit_message="first")
        api.upload_file(path_or_fileobj=b"v2", path_in_repo="nested/notes.txt", repo_id=repo)
        local = Path(snapshot_download(repo))
        got = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
        assert got == [".gitattributes", "README.md", "nested/notes.txt", "weights.bin"], got
        assert (local / "README.md").read_bytes() == Path("{folder}/README.md").read_bytes()
        assert (local / "weights.bin").read_bytes() == Path("{folder}/weights.bin").read_bytes()
        assert (local / "nested/notes.txt").read_bytes() == b"v2"
        first = api.list_repo_commits(repo)[1].commit_id
        old = hf_hub_download(repo, "nested/notes.txt", revision=first)
        assert Path(old).read_text() == "second level\\n"
        try:
            hf_hub_download(repo, "absent.txt")
        except EntryNotFoundError:
            pass
        else:
            raise AssertionError("a missing file must raise EntryNotFoundError")
        """,
    )
    repo = f"{USER}/upload-me"
    assert [c["title"] for c in hub_standin.commits(repo)] == [
        "Upload nested/notes.txt with huggingface_hub",
        "first",
        "initial commit",
    ]
    assert hub_standin.read_file(repo, "README.md") == (folder / "README.md").read_bytes()


def test_dataset_push_to_hub_then_load_dataset(hub_standin: HubStandIn, tmp_path: Path) -> None:
    _run(
        hub_standin,
        tmp_path,
        f"""
        import numpy as np
        from PIL import Image
        from datasets import ClassLabel, Dataset, DatasetDict, Features, Image as ImageFeature, load_dataset

        names = ["covid19", "normal", "pneumonia"]
        features = Features({{"image": ImageFeature(), "label": ClassLabel(names=names)}})
        rng = np.random.default_rng(0)

        def split(n):
            images = [Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L") for _ in range(n)]
            return Dataset.from_dict({{"image": images, "label": [i % 3 for i in range(n)]}}, features=features)

        pushed = DatasetDict({{"train": split(4), "test": split(2)}})
        pushed.push_to_hub("{USER}/tiny-cxr")
        loaded = load_dataset("{USER}/tiny-cxr")
        assert sorted(loaded) == ["test", "train"], loaded
        for name in pushed:
            assert loaded[name].features == features, loaded[name].features
            assert loaded[name]["label"] == pushed[name]["label"]
            for a, b in zip(pushed[name]["image"], loaded[name]["image"]):
                assert np.array_equal(np.asarray(a), np.asarray(b))
        """,
    )
    files = hub_standin.list_files(f"{USER}/tiny-cxr", repo_type="dataset")
    assert "README.md" in files
    assert sum(f.startswith("data/train-") and f.endswith(".parquet") for f in files) == 1, files
    assert b"covid19" in hub_standin.read_file(f"{USER}/tiny-cxr", "README.md", repo_type="dataset")


def test_space_create_and_upload(hub_standin: HubStandIn, tmp_path: Path) -> None:
    folder = tmp_path / "space"
    folder.mkdir()
    (folder / "README.md").write_text("---\ntitle: Demo\nsdk: gradio\napp_file: app.py\n---\n")
    (folder / "app.py").write_text("import gradio as gr\n")
    (folder / "requirements.txt").write_text("torch\n")
    _run(
        hub_standin,
        tmp_path,
        f"""
        from huggingface_hub import HfApi

        api = HfApi()
        url = api.create_repo("{USER}/demo", repo_type="space", space_sdk="gradio")
        assert url.repo_type == "space" and url.repo_id == "{USER}/demo", url
        api.upload_folder(folder_path="{folder}", repo_id="{USER}/demo", repo_type="space")
        info = api.space_info("{USER}/demo")
        assert info.sdk == "gradio", info.sdk
        assert sorted(s.rfilename for s in info.siblings) == [
            ".gitattributes", "README.md", "app.py", "requirements.txt"
        ], info.siblings
        """,
    )
    assert hub_standin.repo_state(f"{USER}/demo", "space")["sdk"] == "gradio"
    assert hub_standin.read_file(f"{USER}/demo", "app.py", repo_type="space") == b"import gradio as gr\n"
    assert not hub_standin.repo_exists(f"{USER}/demo")  # a Space is not a model repo


@pytest.mark.parametrize("create_pr", [False, True])
def test_parent_commit_and_pull_requests(hub_standin: HubStandIn, tmp_path: Path, create_pr: bool) -> None:
    """A stale parent_commit is refused (datasets retries on 412); create_pr commits land on refs/pr/N."""
    _run(
        hub_standin,
        tmp_path,
        f"""
        from huggingface_hub import CommitOperationAdd, HfApi
        from huggingface_hub.errors import HfHubHTTPError

        api = HfApi()
        repo = api.create_repo("{USER}/pr").repo_id
        initial = api.repo_info(repo).sha
        api.upload_file(path_or_fileobj=b"a", path_in_repo="a.txt", repo_id=repo)
        try:
            api.create_commit(repo, [CommitOperationAdd("b.txt", b"b")], commit_message="x", parent_commit=initial)
        except HfHubHTTPError as err:
            assert err.response.status_code == 412, err
        else:
            raise AssertionError("stale parent_commit accepted")
        info = api.upload_file(path_or_fileobj=b"c", path_in_repo="c.txt", repo_id=repo, create_pr={create_pr})
        print("PR", info.pr_revision)
        """,
    )
    main_files = hub_standin.list_files(f"{USER}/pr")
    if create_pr:
        assert main_files == [".gitattributes", "a.txt"]
        assert hub_standin.list_files(f"{USER}/pr", revision="refs/pr/1") == [".gitattributes", "a.txt", "c.txt"]
    else:
        assert main_files == [".gitattributes", "a.txt", "c.txt"]
