"""`adapters push` / `adapters pull`: adapter folders to and from the model hub.

huggingface_hub does the transfer and finds the token (HF_TOKEN, or `hf auth login`). Two
things are ours: a reachability check first, bounded to a few seconds, so that no network (or
a firewall that drops packets) is a clear error at once instead of a hang in DNS or connect;
and verification on both ends, so that only intact safetensors adapters are sent, and a pulled
adapter is used only after `verify` passed on it.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from ..adapter.archive import MEMBERS
from ..errors import AdapterFileError, AdaptersError
from ..io import atomic_dir
from .verify import verify

REACH_TIMEOUT_S = 5.0


class HubError(AdaptersError):
    """The hub cannot be reached, refuses us, or sent something that fails verification."""


def endpoint() -> str:
    # Read at call time (huggingface_hub reads HF_ENDPOINT once, at import).
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def check_reachable(url: str | None = None, timeout: float = REACH_TIMEOUT_S) -> None:
    """Raise HubError unless a TCP connection to the hub opens within `timeout` seconds.

    The connect runs in a thread because name resolution ignores socket timeouts.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise HubError("HF_HUB_OFFLINE is set: the hub is not contacted (unset it to push or "
                       "pull)")
    url = url or endpoint()
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            socket.create_connection((parsed.hostname, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(e)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout)
    if not outcome:
        raise HubError(f"cannot reach {url}: no answer within {timeout:.0f} s (offline, or a "
                       "firewall?)")
    if outcome[0] is not None:
        raise HubError(f"cannot reach {url}: {outcome[0]} (offline? set HF_ENDPOINT for a "
                       "mirror)")


def _hub_error(e: Exception, repo_id: str, action: str) -> HubError:
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status in (401, 403) or isinstance(e, RepositoryNotFoundError):
        return HubError(f"{action} {repo_id}: not authorised or no such repository (HTTP "
                        f"{status}); set HF_TOKEN or run `hf auth login` with a token that "
                        "may " + ("write" if action == "push" else "read") + " it")
    if isinstance(e, HfHubHTTPError):
        return HubError(f"{action} {repo_id}: the hub answered HTTP {status}: "
                        f"{str(e).splitlines()[0]}")
    return HubError(f"{action} {repo_id}: {type(e).__name__}: {e}")


def push(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None,
         message: str | None = None) -> str:
    """Upload the adapter files of `folder` (verified first); return the commit URL."""
    failed = [c for c in verify(folder) if not c.ok]
    if failed:
        raise AdapterFileError(f"{folder}: not pushed, verification failed: "
                               + "; ".join(f"{c.name}: {c.detail}" for c in failed))
    check_reachable()
    api = HfApi(endpoint=endpoint(), token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                                 allow_patterns=list(MEMBERS),
                                 commit_message=message or "Upload adapter (adapterkit)")
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear message
        raise _hub_error(e, repo_id, "push") from e
    return str(getattr(info, "commit_url", info))


def pull(repo_id: str, out: str | Path | None = None, revision: str | None = None,
         token: str | None = None) -> Path:
    """Download an adapter into `out` (default ./<repo name>) and verify it before it lands:
    a failing download leaves nothing behind. Pickles are never downloaded."""
    check_reachable()
    out = Path(out) if out else Path(repo_id.split("/")[-1])
    with atomic_dir(out) as tmp:
        try:
            snapshot_download(repo_id, revision=revision, local_dir=tmp, token=token,
                              allow_patterns=list(MEMBERS), endpoint=endpoint(),
                              etag_timeout=REACH_TIMEOUT_S * 2)
        except Exception as e:  # noqa: BLE001
            raise _hub_error(e, repo_id, "pull") from e
        accept_pulled(tmp, repo_id)
    return out


def accept_pulled(folder: Path, repo_id: str) -> None:
    """Raise unless the downloaded folder passes verify (hash, finite, shapes)."""
    shutil.rmtree(folder / ".cache", ignore_errors=True)  # huggingface_hub's download state
    failed = [c for c in verify(folder) if not c.ok]
    if failed:
        raise HubError(f"pull {repo_id}: the download fails verification, not kept: "
                       + "; ".join(f"{c.name}: {c.detail}" for c in failed))
