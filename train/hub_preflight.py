"""Pushes to the Hugging Face Hub that fail before the work, not after it.

`check_push_access` runs before a training run reads any data (and before `scripts/push_space.py` assembles
anything): it asks the Hub, through `huggingface_hub`'s own calls and errors, whether the push at the end can succeed,
and raises `PushError` with one sentence naming the cause and the fix. `push_with_retries` retries the push itself on
transient errors (connection, timeout, 408/429/5xx) with exponential backoff; any other failure, or the last transient
one, becomes a `PushError` whose sentence the caller completes with the command that pushes the saved folder later.

The checks, in order: HF_HUB_OFFLINE is not set; the repo id is valid; a token is found (`--hub_token`, HF_TOKEN or
`hf auth login`); the endpoint answers and accepts the token (`whoami`); the token may write (not a read token; a
fine-grained token with `repo.write` on the namespace or repo); and the token's owner may write to the namespace (the
user's own, or an org where their role is admin, write or contributor).
"""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")
WRITE_ROLES = ("admin", "write", "contributor")  # org roles that may create repos in the org
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
SKIP_HINT = "pass --skip_push_check if the Hub will only be reachable when the run ends"


class PushError(RuntimeError):
    """A push that cannot or did not succeed; str() is one sentence naming the cause and the fix."""


@dataclass(frozen=True)
class PushTarget:
    repo_id: str  # always owner/name
    repo_type: str
    user: str
    endpoint: str


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection failures and timeouts of the HTTP client huggingface_hub uses (httpx2 in 2.x, httpx in 1.x)."""
    try:
        import httpx2 as http
    except ImportError:  # pragma: no cover - depends on the huggingface_hub generation installed
        import httpx as http
    return (http.TransportError, ConnectionError, TimeoutError)


def _status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def check_push_access(
    repo_id: str | None, *, repo_type: str = "model", token: str | None = None, flag: str = "--push_to_hub"
) -> PushTarget:
    """Ask the Hub whether `token` can create or write `repo_id` (of `repo_type`); raises PushError if not."""
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HFValidationError, OfflineModeIsEnabled
    from huggingface_hub.utils import validate_repo_id

    what = f"{repo_type} repo {repo_id!r}" if repo_type != "model" else f"model repo {repo_id!r}"
    if constants.HF_HUB_OFFLINE:
        raise PushError(
            f"{flag} cannot push the {what}: HF_HUB_OFFLINE is set; unset it (or drop {flag}), or {SKIP_HINT}."
        )
    if not repo_id:
        raise PushError(f"{flag} needs a repo id (OWNER/NAME), and none was given.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PushError(f"{flag}: {repo_id!r} is not a valid Hub repo id: {error}") from None
    token = token or get_token()
    if not token:
        raise PushError(
            f"{flag} found no Hugging Face token: log in with `hf auth login`, set HF_TOKEN, or pass --hub_token."
        )
    endpoint = constants.ENDPOINT
    api = HfApi(token=token)
    try:
        identity = api.whoami()
    except OfflineModeIsEnabled:  # pragma: no cover - caught above; kept for an environment changed mid-process
        raise PushError(f"{flag}: HF_HUB_OFFLINE is set; unset it, or {SKIP_HINT}.") from None
    except _transport_errors() as error:
        raise PushError(
            f"{flag}: the Hub at {endpoint} cannot be reached ({type(error).__name__}: {error}); check the network "
            f"and HF_ENDPOINT, or {SKIP_HINT}."
        ) from None
    except Exception as error:
        status = _status(error)
        if status == 401:
            raise PushError(
                f"{flag}: the Hub at {endpoint} rejected the token (401 Unauthorized); create a token with write "
                f"access at {endpoint}/settings/tokens and log in with `hf auth login` or pass --hub_token."
            ) from None
        answer = f"HTTP {status}" if status else f"{type(error).__name__}: {error}"
        raise PushError(f"{flag}: the Hub at {endpoint} did not answer whoami ({answer}); {SKIP_HINT}.") from None
    user = identity.get("name") or "?"
    namespace, _, name = repo_id.rpartition("/")
    namespace = namespace or user
    full_id = f"{namespace}/{name}"
    access = (identity.get("auth") or {}).get("accessToken") or {}
    role = access.get("role")
    if role == "read":
        raise PushError(
            f"{flag}: the token of {user} is read-only, so it cannot write {full_id}; create a token with write "
            f"access at {endpoint}/settings/tokens."
        )
    orgs = {org.get("name"): org.get("roleInOrg") for org in identity.get("orgs") or []}
    if namespace != user and orgs.get(namespace) not in WRITE_ROLES:
        where = f"a member of {namespace} with role {orgs[namespace]!r}" if namespace in orgs else f"not {namespace}"
        raise PushError(
            f"{flag}: the token belongs to {user}, {where}, so it cannot create or write {full_id}; push to "
            f"{user}/{name} instead, or ask an admin of {namespace} for write access."
        )
    if role == "fineGrained" and not _fine_grained_can_write(access, namespace, full_id):
        raise PushError(
            f"{flag}: the fine-grained token of {user} has no repo.write permission on {namespace} or {full_id}; "
            f"add it at {endpoint}/settings/tokens."
        )
    logger.info("push check: %s can write the %s %s at %s", user, repo_type, full_id, endpoint)
    return PushTarget(full_id, repo_type, user, endpoint)


def _fine_grained_can_write(access: dict[str, Any], namespace: str, repo_id: str) -> bool:
    scopes = (access.get("fineGrained") or {}).get("scoped") or []
    for scope in scopes:
        entity = scope.get("entity") or {}
        if entity.get("name") in (namespace, repo_id) and "repo.write" in (scope.get("permissions") or []):
            return True
    return False


def push_with_retries(
    push: Callable[[], T], what: str, *, attempts: int = 4, base_wait: float = 2.0, max_wait: float = 30.0
) -> T:
    """`push()`, retried on transient errors with waits base_wait, 2*base_wait, ... (capped at max_wait); any other
    error, or the last transient one, raises PushError with one sentence (without the retry command: the caller
    knows the folder and adds it)."""
    for attempt in range(1, attempts + 1):
        try:
            return push()
        except Exception as error:
            status = _status(error)
            transient = isinstance(error, _transport_errors()) or status in TRANSIENT_STATUS
            reason = f"HTTP {status}" if status else type(error).__name__
            detail = str(error).splitlines()[0][:300] if str(error) else reason
            if transient and attempt < attempts:
                wait = min(base_wait * 2 ** (attempt - 1), max_wait)
                logger.warning("pushing %s failed (%s, attempt %d of %d); retrying in %.0f s", what, reason,
                               attempt, attempts, wait)  # fmt: skip
                time.sleep(wait)
                continue
            tries = f" after {attempt} attempts" if attempt > 1 else ""
            raise PushError(f"pushing {what} failed{tries} ({reason}: {detail})") from error
    raise AssertionError("unreachable")  # pragma: no cover


def command_line(*words: str) -> str:
    """A shell-quoted command line the user can paste."""
    return " ".join(shlex.quote(word) for word in words)
