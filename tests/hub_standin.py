"""A local stand-in of the Hugging Face Hub HTTP API, so push/pull tests run without network.

The real clients (`huggingface_hub`, `transformers`, `datasets`) talk to it unchanged: point `HF_ENDPOINT` at
`HubStandIn.endpoint` *before* they are imported (they read it at import time), which is why push tests run the
client code in a subprocess with the environment from `hub_env`. Only the endpoints those clients were seen to call
are served; anything else is logged in `unknown_requests` and answered 404, so gaps show up in the test.

Stdlib only. Repos live under `root` (JSON state per repo plus a content-addressed blob store), with branches and a
commit history whose ids are 40-hex like git's. Regular files arrive base64-inline in the commit; files matching
`lfs_patterns` (or bigger than `lfs_threshold`) go through the basic git-LFS upload, as on the Hub — `datasets`
needs this, since it deletes each parquet shard right after `preupload_lfs_files`.

Tests get a started one from the `hub_standin` fixture (tests/conftest.py).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import traceback
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

logger = logging.getLogger(__name__)

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# fmt: off
# What the Hub's default .gitattributes sends through LFS (the subset that matters for ML artefacts).
DEFAULT_LFS_PATTERNS = (
    "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.onnx", "*.h5", "*.msgpack", "*.npy", "*.npz",
    "*.parquet", "*.arrow", "*.zip", "*.gz", "*.tar", "*.pkl", "*.pickle", "*.joblib",
)
# Switches that would send the clients offline or to the Hub's staging host instead of HF_ENDPOINT.
WRITE_ROLES = ("admin", "write", "contributor")  # org roles that may create and write repos
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_CO_STAGING")
# Cache and token locations the test process may have pinned; the subprocess derives them all from its HF_HOME.
CACHE_VARS = (
    "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HF_XET_CACHE", "HF_TOKEN_PATH", "HF_MODULES_CACHE",
    "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE",
)
# fmt: on


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_oid(content: bytes) -> str:
    """Git's blob id, which the client compares with preupload's `oid` to skip unchanged regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class HubError(Exception):
    """An HTTP error with the `X-Error-Code` the client maps to its exception classes."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class HubStore:
    """Repos, branches, commits and blobs on disk; every public method is safe to call from handler threads."""

    def __init__(self, root: Path, lfs_patterns: tuple[str, ...], lfs_threshold: int | None) -> None:
        self.root = Path(root)
        self.lfs_patterns, self.lfs_threshold = lfs_patterns, lfs_threshold
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], dict[str, Any]] = {}
        for state_file in sorted((self.root / "repos").glob("*/*/*.json")):
            state = json.loads(state_file.read_text())
            self.repos[(state["type"], state["id"])] = state

    # -- blobs and persistence ------------------------------------------------------------------------------------
    def put_blob(self, content: bytes) -> str:
        sha256 = hashlib.sha256(content).hexdigest()
        path = self.root / "blobs" / sha256
        if not path.exists():
            tmp = path.with_suffix(f".tmp{threading.get_ident()}")
            tmp.write_bytes(content)
            os.replace(tmp, path)
        return sha256

    def has_blob(self, sha256: str) -> bool:
        return (self.root / "blobs" / sha256).is_file()

    def blob(self, sha256: str) -> bytes:
        return (self.root / "blobs" / sha256).read_bytes()

    def _save(self, state: dict[str, Any]) -> None:
        path = self.root / "repos" / f"{state['type']}s" / f"{state['id']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, path)

    # -- repos and revisions --------------------------------------------------------------------------------------
    def repo(self, repo_type: str, repo_id: str) -> dict[str, Any]:
        state = self.repos.get((repo_type, repo_id))
        if state is None:
            raise HubError(404, f"Repository {repo_type}s/{repo_id} not found", "RepoNotFound")
        return state

    def resolve(self, state: dict[str, Any], revision: str) -> str:
        """Branch name (including refs/pr/N) or full commit id -> commit id."""
        if revision in state["branches"]:
            return state["branches"][revision]
        if revision.startswith("refs/heads/") and revision[11:] in state["branches"]:
            return state["branches"][revision[11:]]
        if revision in state["commits"]:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def files(self, state: dict[str, Any], commit_id: str) -> dict[str, dict[str, Any]]:
        return state["commits"][commit_id]["files"]

    def history(self, state: dict[str, Any], commit_id: str | None) -> list[dict[str, Any]]:
        """Commits from `commit_id` back to the initial one (first parents only: the stand-in never merges)."""
        history = []
        while commit_id is not None:
            history.append(state["commits"][commit_id])
            commit_id = state["commits"][commit_id]["parent"]
        return history

    def is_lfs(self, path: str, size: int) -> bool:
        name = path.rsplit("/", 1)[-1]
        if any(
            fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(path, pattern) for pattern in self.lfs_patterns
        ):
            return True
        return self.lfs_threshold is not None and size >= self.lfs_threshold

    def file_record(self, path: str, content: bytes, lfs: bool) -> dict[str, Any]:
        sha256 = self.put_blob(content)
        oid = git_blob_oid(lfs_pointer(sha256, len(content)) if lfs else content)
        return {"sha256": sha256, "size": len(content), "lfs": lfs, "oid": oid}

    def create_repo(self, repo_type: str, repo_id: str, private: bool, sdk: str | None) -> bool:
        """Create with an initial commit holding .gitattributes, like the Hub; False if it already exists."""
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                return False
            state = {
                "type": repo_type,
                "id": repo_id,
                "private": private,
                "sdk": sdk,
                "createdAt": _now(),
                "branches": {},
                "commits": {},
                "prCount": 0,
            }
            gitattributes = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in self.lfs_patterns)
            files = {".gitattributes": self.file_record(".gitattributes", gitattributes.encode(), lfs=False)}
            self._add_commit(state, "main", None, files, "initial commit", "", author="system")
            self.repos[(repo_type, repo_id)] = state  # visible to unlocked readers only once it has a main branch
            return True

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        with self.lock:
            self.repo(repo_type, repo_id)
            del self.repos[(repo_type, repo_id)]
            (self.root / "repos" / f"{repo_type}s" / f"{repo_id}.json").unlink()

    def _add_commit(
        self,
        state: dict[str, Any],
        branch: str,
        parent: str | None,
        files: dict[str, Any],
        title: str,
        message: str,
        author: str,
    ) -> str:
        date = _now()
        seed = json.dumps(
            [parent, sorted((p, f["oid"]) for p, f in files.items()), title, message, date, len(state["commits"])]
        )
        commit_id = hashlib.sha1(seed.encode()).hexdigest()
        state["commits"][commit_id] = {
            "id": commit_id,
            "parent": parent,
            "title": title,
            "message": message,
            "date": date,
            "author": author,
            "files": files,
        }
        state["branches"][branch] = commit_id
        state["lastModified"] = date
        self._save(state)
        return commit_id

    def commit(
        self, repo_type: str, repo_id: str, revision: str, lines: list[dict[str, Any]], create_pr: bool, author: str
    ) -> tuple[str, str]:
        """Apply one NDJSON commit payload; returns (commit id, branch it landed on)."""
        with self.lock:
            state = self.repo(repo_type, repo_id)
            head = self.resolve(state, revision)
            if revision not in state["branches"] and not create_pr:
                raise HubError(400, f"Can only commit to a branch, not {revision}")
            header = next((line["value"] for line in lines if line.get("key") == "header"), None)
            if header is None:
                raise HubError(400, "commit payload has no header line")
            parent_commit = header.get("parentCommit")
            if parent_commit and not create_pr and parent_commit != head:
                raise HubError(412, f"parentCommit {parent_commit} is not the head of {revision} ({head})")
            files = dict(self.files(state, head))
            for line in lines:
                key, value = line.get("key"), line.get("value", {})
                if key == "file":
                    raw = value["content"]
                    content = base64.b64decode(raw) if value.get("encoding") == "base64" else raw.encode()
                    files[value["path"]] = self.file_record(value["path"], content, lfs=False)
                elif key == "lfsFile":
                    if not self.has_blob(value["oid"]):
                        raise HubError(400, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                    files[value["path"]] = self.file_record(value["path"], self.blob(value["oid"]), lfs=True)
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    doomed = [p for p in files if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, "A folder with this name doesn't exist", "EntryNotFound")
                    for path in doomed:
                        del files[path]
                elif key != "header":
                    raise HubError(400, f"unsupported commit operation {key!r}")
            branch = revision
            if create_pr:
                state["prCount"] += 1
                branch = f"refs/pr/{state['prCount']}"
            commit_id = self._add_commit(
                state, branch, head, files, header.get("summary") or "update", header.get("description") or "", author
            )
            return commit_id, branch

    def create_branch(self, repo_type: str, repo_id: str, branch: str, starting_point: str | None) -> None:
        with self.lock:
            state = self.repo(repo_type, repo_id)
            if branch in state["branches"]:
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            state["branches"][branch] = self.resolve(state, starting_point or "main")
            self._save(state)

    def delete_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        with self.lock:
            state = self.repo(repo_type, repo_id)
            if state["branches"].pop(branch, None) is None:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            self._save(state)


def _entry(path: str, record: dict[str, Any]) -> dict[str, Any]:
    """A file as `/tree` and `/paths-info` describe it."""
    entry = {"type": "file", "oid": record["oid"], "size": record["size"], "path": path}
    if record["lfs"]:
        pointer_size = len(lfs_pointer(record["sha256"], record["size"]))
        entry["lfs"] = {"oid": record["sha256"], "size": record["size"], "pointerSize": pointer_size}
    return entry


def _directories(files: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Every directory implied by the file paths -> a stable tree id."""
    dirs: dict[str, list[str]] = {}
    for path, record in files.items():
        parts = path.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            dirs.setdefault("/".join(parts[:depth]), []).append(f"{path}:{record['oid']}")
    return {d: hashlib.sha1("\n".join(sorted(items)).encode()).hexdigest() for d, items in dirs.items()}


class _Handler(BaseHTTPRequestHandler):
    """Routes one request; errors become Hub-shaped JSON with `X-Error-Code` headers."""

    protocol_version = "HTTP/1.1"  # keep-alive: every response carries Content-Length
    server: _StandInServer

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- plumbing -------------------------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.server.standin.requests.append((self.command, self.path, status))

    def _json(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _dispatch(self, method: str) -> None:
        self.body = self._read_body() if method in ("POST", "PUT", "DELETE") else b""
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        segments = [unquote(s) for s in url.path.strip("/").split("/")]
        try:
            if not self._route(method, segments):
                self.server.standin.unknown_requests.append((method, self.path))
                logger.warning("hub stand-in: no route for %s %s", method, self.path)
                raise HubError(404, f"hub stand-in has no route for {method} {url.path}")
        except HubError as err:
            headers = {"X-Error-Message": err.message.encode("ascii", "replace").decode(), **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._json({"error": err.message}, err.status, headers)
        except Exception as err:  # a bug in the stand-in: make it loud on the client side too
            self.server.standin.errors.append(traceback.format_exc())
            logger.exception("hub stand-in crashed on %s %s", method, self.path)
            self._json({"error": f"hub stand-in crashed: {err!r}"}, 500)

    def _auth_user(self) -> str:
        """The user a `Bearer` token belongs to: any token is the stand-in's user unless `tokens` names the valid
        ones (token -> user), as the Hub answers an unknown token with 401."""
        header = self.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            raise HubError(401, "Invalid credentials in Authorization header")
        tokens = self.server.standin.tokens
        if tokens is None:
            return self.server.standin.user
        if header[7:] not in tokens:
            raise HubError(401, "Invalid username or password.")
        return tokens[header[7:]]

    def _writer(self, repo_id: str) -> str:
        """The authenticated user, if they may write to `repo_id`'s namespace (their own, or an org where their role
        is write/admin/contributor); 403 as the Hub answers otherwise. `refuse_writes` makes every write fail with
        that status (a Hub outage, or a token revoked mid-run) and counts the refusals."""
        standin = self.server.standin
        user = self._auth_user()
        if standin.refuse_writes is not None:
            standin.refused += 1
            raise HubError(standin.refuse_writes, "the stand-in refuses writes (refuse_writes)")
        namespace = repo_id.split("/")[0]
        if namespace != user and standin.orgs.get(namespace) not in WRITE_ROLES:
            raise HubError(403, f"You don't have the rights to create or write to {repo_id}", "Forbidden")
        return user

    def _body_json(self) -> Any:
        return json.loads(self.body or b"{}")

    @property
    def _store(self) -> HubStore:
        return self.server.standin.store

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.server.standin.endpoint}/{URL_PREFIXES[repo_type]}{repo_id}"

    def _readable(self, repo_type: str, repo_id: str) -> dict[str, Any]:
        state = self._store.repo(repo_type, repo_id)
        if state["private"] and not self.headers.get("Authorization"):
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return state

    # -- routing --------------------------------------------------------------------------------------------------
    def _route(self, method: str, seg: list[str]) -> bool:
        if seg[:1] == ["api"]:
            return self._route_api(method, seg[1:])
        if seg[:2] == ["_standin", "lfs"] and len(seg) == 3 and method == "PUT":
            return self._lfs_put(seg[2])
        repo_type = "model"
        if seg[:1] and seg[0] in ("datasets", "spaces"):
            repo_type, seg = REPO_TYPES[seg[0]], seg[1:]
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(repo_type, f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]))
        is_batch = len(seg) == 6 and seg[2:] == ["info", "lfs", "objects", "batch"] and seg[1].endswith(".git")
        if is_batch and method == "POST":
            return self._lfs_batch(repo_type, f"{seg[0]}/{seg[1][:-4]}")
        return False

    def _route_api(self, method: str, seg: list[str]) -> bool:
        if seg == ["whoami-v2"] and method == "GET":
            user = self._auth_user()
            standin = self.server.standin
            auth = {"type": "access_token", "accessToken": {"displayName": "hub-standin", "role": standin.token_role}}
            orgs = [{"type": "org", "name": name, "roleInOrg": role} for name, role in sorted(standin.orgs.items())]
            self._json(
                {
                    "type": "user",
                    "id": "0" * 24,
                    "name": user,
                    "fullname": user,
                    "email": None,
                    "emailVerified": True,
                    "isPro": False,
                    "orgs": orgs,
                    "auth": auth,
                }
            )
            return True
        if seg == ["repos", "create"] and method == "POST":
            return self._create_repo()
        if seg == ["repos", "delete"] and method == "DELETE":
            self._auth_user()
            payload = self._body_json()
            name = f"{payload.get('organization') or self.server.standin.user}/{payload['name']}"
            self._store.delete_repo(payload.get("type") or "model", name)
            self._json({})
            return True
        if seg == ["validate-yaml"] and method == "POST":
            content = self._body_json().get("content", "")
            lines = content.splitlines()
            if lines[:1] == ["---"] and "---" not in lines[1:]:
                self._json({"errors": [{"message": "YAML front matter is not closed by '---'"}], "warnings": []}, 400)
            else:
                self._json({"errors": [], "warnings": []})
            return True
        if len(seg) < 3 or seg[0] not in REPO_TYPES:
            return False
        repo_type, repo_id, rest = REPO_TYPES[seg[0]], f"{seg[1]}/{seg[2]}", seg[3:]
        if method == "GET" and (rest == [] or (len(rest) == 2 and rest[0] == "revision")):
            return self._repo_info(repo_type, repo_id, rest[1] if rest else "main")
        if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
            return self._tree(repo_type, repo_id, rest[1], "/".join(rest[2:]))
        if method == "POST" and len(rest) == 2 and rest[0] == "paths-info":
            return self._paths_info(repo_type, repo_id, rest[1])
        if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
            return self._preupload(repo_type, repo_id, rest[1])
        if method == "POST" and len(rest) == 2 and rest[0] == "commit":
            return self._commit(repo_type, repo_id, rest[1])
        if method == "GET" and rest == ["refs"]:
            return self._refs(repo_type, repo_id)
        if method == "GET" and len(rest) == 2 and rest[0] == "commits":
            return self._commits(repo_type, repo_id, rest[1])
        if method in ("POST", "DELETE") and len(rest) == 2 and rest[0] == "branch":
            self._auth_user()
            if method == "POST":
                self._store.create_branch(repo_type, repo_id, rest[1], self._body_json().get("startingPoint"))
            else:
                self._store.delete_branch(repo_type, repo_id, rest[1])
            self._json({})
            return True
        return False

    # -- endpoints ------------------------------------------------------------------------------------------------
    def _create_repo(self) -> bool:
        user = self._auth_user()
        payload = self._body_json()
        self._writer(f"{payload.get('organization') or user}/{payload['name']}")
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIXES:
            raise HubError(400, f"unsupported repo type {repo_type!r}")
        if repo_type == "space" and not payload.get("sdk"):
            raise HubError(400, "a Space needs an sdk")
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        private = payload.get("visibility", "public") != "public" or bool(payload.get("private"))
        url = self._repo_url(repo_type, repo_id)
        if not self._store.create_repo(repo_type, repo_id, private, payload.get("sdk")):
            self._json({"error": f"You already created this {repo_type} repo", "url": url}, 409)
        else:
            self._json({"url": url, "name": repo_id, "id": repo_id})
        return True

    def _repo_info(self, repo_type: str, repo_id: str, revision: str) -> bool:
        state = self._readable(repo_type, repo_id)
        sha = self._store.resolve(state, revision)
        siblings = []
        for path, record in sorted(self._store.files(state, sha).items()):
            sibling = {"rfilename": path, "size": record["size"], "blobId": record["oid"]}
            if record["lfs"]:
                pointer_size = len(lfs_pointer(record["sha256"], record["size"]))
                sibling["lfs"] = {"sha256": record["sha256"], "size": record["size"], "pointerSize": pointer_size}
            siblings.append(sibling)
        info = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": sha,
            "private": state["private"],
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "createdAt": state["createdAt"],
            "lastModified": state["lastModified"],
            "siblings": siblings,
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        if repo_type == "space":
            info.update(
                sdk=state["sdk"], subdomain=repo_id.replace("/", "-").lower(), host=self._repo_url("space", repo_id)
            )
        self._json(info)
        return True

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> bool:
        state = self._readable(repo_type, repo_id)
        commit_id = self._store.resolve(state, revision)
        files, recursive = (
            self._store.files(state, commit_id),
            self.query.get("recursive", "").lower() in ("1", "true"),
        )
        dirs = _directories(files)
        if path and path not in dirs:
            raise HubError(404, f"{path} is not a folder at {revision}", "EntryNotFound", {"X-Repo-Commit": commit_id})
        prefix = f"{path}/" if path else ""

        def wanted(entry_path: str) -> bool:
            return entry_path.startswith(prefix) and (recursive or "/" not in entry_path[len(prefix) :])

        entries = [{"type": "directory", "oid": oid, "size": 0, "path": d} for d, oid in dirs.items() if wanted(d)]
        entries += [_entry(p, record) for p, record in files.items() if wanted(p)]
        self._json(sorted(entries, key=lambda e: (e["type"] != "directory", e["path"])))
        return True

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> bool:
        state = self._readable(repo_type, repo_id)
        files = self._store.files(state, self._store.resolve(state, revision))
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = self._body_json().get("paths", [])
        else:
            paths = parse_qs(self.body.decode()).get("paths", [])
        dirs = _directories(files)
        found = []
        for path in paths:
            if path in files:
                found.append(_entry(path, files[path]))
            elif path.rstrip("/") in dirs:
                found.append({"type": "directory", "oid": dirs[path.rstrip("/")], "size": 0, "path": path.rstrip("/")})
        self._json(found)
        return True

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> bool:
        self._writer(repo_id)
        state = self._store.repo(repo_type, repo_id)
        files = self._store.files(state, self._store.resolve(state, revision))
        answer = []
        for item in self._body_json().get("files", []):
            lfs = item["size"] > 0 and self._store.is_lfs(item["path"], item["size"])
            entry = {"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            remote = files.get(item["path"])
            if remote is not None:  # the client skips files whose oid it recomputes identically
                entry["oid"] = remote["sha256"] if remote["lfs"] else remote["oid"]
            answer.append(entry)
        self._json({"files": answer, "commitOid": self._store.resolve(state, revision)})
        return True

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> bool:
        author = self._writer(repo_id)
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        create_pr = self.query.get("create_pr") == "1"
        commit_id, branch = self._store.commit(repo_type, repo_id, revision, lines, create_pr, author)
        repo_url = self._repo_url(repo_type, repo_id)
        pr_url = f"{repo_url}/discussions/{branch.rsplit('/', 1)[-1]}" if create_pr else None
        self._json(
            {
                "success": True,
                "commitOid": commit_id,
                "commitUrl": f"{repo_url}/commit/{commit_id}",
                "pullRequestUrl": pr_url,
                "hookOutput": "",
            }
        )
        return True

    def _refs(self, repo_type: str, repo_id: str) -> bool:
        state = self._readable(repo_type, repo_id)
        refs: dict[str, list[dict[str, str]]] = {"branches": [], "converts": [], "tags": [], "pullRequests": []}
        for name, target in sorted(state["branches"].items()):
            if name.startswith("refs/pr/"):
                refs["pullRequests"].append({"name": name, "ref": name, "targetCommit": target})
            else:
                refs["branches"].append({"name": name, "ref": f"refs/heads/{name}", "targetCommit": target})
        if self.query.get("include_prs") != "1":
            del refs["pullRequests"]
        self._json(refs)
        return True

    def _commits(self, repo_type: str, repo_id: str, revision: str) -> bool:
        state = self._readable(repo_type, repo_id)
        history = self._store.history(state, self._store.resolve(state, revision))
        self._json(
            [
                {
                    "id": c["id"],
                    "title": c["title"],
                    "message": c["message"],
                    "date": c["date"],
                    "authors": [{"user": c["author"]}],
                }
                for c in history
            ]
        )
        return True

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> bool:
        state = self._readable(repo_type, repo_id)
        commit_id = self._store.resolve(state, revision)
        record = self._store.files(state, commit_id).get(path)
        if record is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit_id})
        content = self._store.blob(record["sha256"])
        etag = record["sha256"] if record["lfs"] else record["oid"]
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{etag}"',
            "X-Repo-Commit": commit_id,
            "Accept-Ranges": "bytes",
        }
        if record["lfs"]:  # what the Hub puts on its redirect to the CDN
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(record["size"])})
        byte_range = self.headers.get("Range", "")
        if not byte_range.startswith("bytes="):
            self._send(200, content, headers)
            return True
        start_text, _, end_text = byte_range[6:].split(",")[0].strip().partition("-")
        size = len(content)
        if start_text:
            start, end = int(start_text), min(int(end_text) if end_text else size - 1, size - 1)
        else:  # suffix range: the last N bytes
            start, end = max(size - int(end_text), 0), size - 1
        if start >= size or start > end:
            raise HubError(416, "Requested range not satisfiable", None, {"Content-Range": f"bytes */{size}"})
        self._send(206, content[start : end + 1], {**headers, "Content-Range": f"bytes {start}-{end}/{size}"})
        return True

    def _lfs_batch(self, repo_type: str, repo_id: str) -> bool:
        self._writer(repo_id)
        self._store.repo(repo_type, repo_id)
        payload = self._body_json()
        if payload.get("operation") != "upload":
            raise HubError(400, "the stand-in only serves LFS uploads (downloads go through /resolve)")
        objects = []
        for obj in payload.get("objects", []):
            item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not self._store.has_blob(obj["oid"]):
                href = f"{self.server.standin.endpoint}/_standin/lfs/{obj['oid']}"
                item["actions"] = {"upload": {"href": href, "expires_in": 3600}}
            objects.append(item)
        self._json({"transfer": "basic", "objects": objects}, headers={"Content-Type": "application/vnd.git-lfs+json"})
        return True

    def _lfs_put(self, oid: str) -> bool:
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, f"uploaded content does not hash to {oid}")
        self._store.put_blob(self.body)
        self._send(200)
        return True


class _StandInServer(ThreadingHTTPServer):
    daemon_threads = True
    standin: HubStandIn


class HubStandIn:
    """The Hub on 127.0.0.1: `with HubStandIn(tmp_path) as hub: ... hub.endpoint ... hub.read_file(...)`."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        user: str = "standin-user",
        lfs_patterns: tuple[str, ...] = DEFAULT_LFS_PATTERNS,
        lfs_threshold: int | None = 10_000_000,
        tokens: dict[str, str] | None = None,
        orgs: dict[str, str] | None = None,
        token_role: str = "write",
    ) -> None:
        self.user = user
        # Credentials and rights, as whoami-v2 reports them and writes enforce them (`_Handler._writer`): `tokens`
        # (token -> user; None accepts any token as `user`), the user's `orgs` (name -> roleInOrg), the token's role.
        self.tokens, self.orgs, self.token_role = tokens, dict(orgs or {}), token_role
        self.refuse_writes: int | None = None  # an HTTP status every write is answered with, while set
        self.refused = 0  # writes refused so far because of refuse_writes
        self.store = HubStore(Path(root), tuple(lfs_patterns), lfs_threshold)
        self.requests: list[tuple[str, str, int]] = []  # (method, raw path, status) of every answered request
        self.unknown_requests: list[tuple[str, str]] = []  # requests no route matched (answered 404)
        self.errors: list[str] = []  # tracebacks of stand-in crashes (answered 500)
        self._server: _StandInServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("HubStandIn is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubStandIn:
        self._server = _StandInServer(("127.0.0.1", 0), _Handler)
        self._server.standin = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="hub-standin", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HubStandIn:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- read-back for assertions ---------------------------------------------------------------------------------
    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        return (repo_type, repo_id) in self.store.repos

    def repo_state(self, repo_id: str, repo_type: str = "model") -> dict[str, Any]:
        """The raw state (type, id, private, sdk, branches, commits) — read-only by convention."""
        return self.store.repo(repo_type, repo_id)

    def list_files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> list[str]:
        with self.store.lock:
            state = self.store.repo(repo_type, repo_id)
            return sorted(self.store.files(state, self.store.resolve(state, revision)))

    def file_info(self, repo_id: str, path: str, repo_type: str = "model", revision: str = "main") -> dict[str, Any]:
        """{"sha256", "size", "lfs", "oid"} of one file; KeyError if absent."""
        with self.store.lock:
            state = self.store.repo(repo_type, repo_id)
            return dict(self.store.files(state, self.store.resolve(state, revision))[path])

    def read_file(self, repo_id: str, path: str, repo_type: str = "model", revision: str = "main") -> bytes:
        return self.store.blob(self.file_info(repo_id, path, repo_type, revision)["sha256"])

    def commits(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> list[dict[str, Any]]:
        """Newest first: id, parent, title, message, date, author (files left out)."""
        with self.store.lock:
            state = self.store.repo(repo_type, repo_id)
            history = self.store.history(state, self.store.resolve(state, revision))
            return [{k: v for k, v in c.items() if k != "files"} for c in history]

    def resolve_url(self, repo_id: str, path: str, repo_type: str = "model", revision: str = "main") -> str:
        return f"{self.endpoint}/{URL_PREFIXES[repo_type]}{repo_id}/resolve/{quote(revision, safe='')}/{quote(path)}"


def hub_env(endpoint: str, hf_home: str | os.PathLike[str], base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a subprocess whose Hub clients must talk to `endpoint` (they read it at import time).

    Drops the offline switches and any cache/token path inherited from the test process (tests/conftest.py points
    them at a shared home), uses a fresh `hf_home`, a dummy token, no Xet (the stand-in has no CAS), no proxy for
    127.0.0.1, no progress bars or telemetry, one thread.
    """
    env = dict(os.environ if base is None else base)
    for name in OFFLINE_VARS + CACHE_VARS:
        env.pop(name, None)
    hf_home = str(hf_home)
    no_proxy = ",".join(filter(None, [env.get("NO_PROXY", ""), "127.0.0.1", "localhost"]))
    env.update(
        {
            "HF_ENDPOINT": endpoint,
            "HF_TOKEN": "dummy",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HOME": hf_home,
            "HF_DATASETS_CACHE": os.path.join(hf_home, "datasets"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def run_python(code: str, env: dict[str, str], timeout: float = 300, cwd: str | os.PathLike[str] | None = None) -> str:
    """Run `code` in a fresh interpreter with `env`; return stdout, or fail the test showing both streams."""
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        pytest.fail(
            f"subprocess failed (rc={proc.returncode})\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
        )
    return proc.stdout
