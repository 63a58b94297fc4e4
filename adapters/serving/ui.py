"""The web page: a playground over the server's models, and the training runs under a folder.

`install(app, root, registry)` adds the page and the JSON it reads under /ui/api/ (runs, a
metrics.jsonl tail, a run's summary, eval results, adapter cards) to an app. The page's own
files (HTML/JS/CSS from web/, no data in them) are served by an outer middleware, ahead of
the API key: a browser cannot send a key with a page load. Everything else, /ui/api/
included, passes the app's `Guard` (protocol.py): the page asks for the key and sends it as
`Authorization: Bearer KEY`. Every file read lies inside `root` (links resolved first) and
has one of the names below; a loaded adapter's card is read from its registry folder.

`create_ui_app(root, api_key)` is the page without a model (`adapters ui RUNS_DIR`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from fastapi import APIRouter, FastAPI
from starlette.responses import FileResponse, JSONResponse

from ..adapter.files import CARD_FILE, CONFIG_FILE, MANIFEST_FILE
from ..config import BASE_NAME, HIGHER_IS_BETTER
from ..data.formats import DEFAULT_TEMPLATE
from ..errors import ConfigError
from ..safe_yaml import load_yaml
from .protocol import ApiError, Guard, error_body
from .studio import Studio, base_settings, studio_routes

WEB = Path(__file__).parent / "web"
PAGE_FILES = {"/": "index.html", "/ui/index.html": "index.html", "/ui/app.js": "app.js",
              "/ui/style.css": "style.css", "/favicon.ico": "favicon.svg",
              "/ui/favicon.svg": "favicon.svg"}
MEDIA = {".html": "text/html", ".js": "text/javascript", ".css": "text/css",
         ".svg": "image/svg+xml"}
# data.format -> how the page sends a prompt to an adapter trained on it
PROMPT_MODES = {"prompt_completion": "template", "preference": "template", "chat": "chat",
                "sharegpt": "chat"}
METRICS, RESULTS, RECIPE = "metrics.jsonl", "results.json", "recipe.resolved.yaml"
MAX_CHUNK = 1 << 20  # bytes of metrics.jsonl per request; the page asks again for more
MAX_TEXT = 256 << 10  # a card, recipe or manifest larger than this is cut
MAX_DEPTH, MAX_RUNS = 4, 500
STALE_S = 120  # a run whose metrics.jsonl has not changed for this long is not training
SKIP_DIRS = {"checkpoints", "tensorboard", "wandb", "mlartifacts", "__pycache__"}
# The page works offline and loads nothing from elsewhere.
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                                      "frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


class PageFiles:
    """ASGI middleware: GET of the page's files is answered here, before the key check."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        name = PAGE_FILES.get(scope.get("path", "")) if scope["type"] == "http" else None
        if name is None or scope["method"] not in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        response = FileResponse(WEB / name, media_type=MEDIA[Path(name).suffix],
                                headers=HEADERS)
        await response(scope, receive, send)


# ---- files under the root ------------------------------------------------------------------

def confined(root: Path, rel: str, name: str | None = None) -> Path:
    """`root/rel[/name]`, its links resolved, if it lies inside root; else a 403."""
    real_root = root.resolve()
    try:
        target = (real_root / rel / (name or "")).resolve()
        target.is_file()  # the OS's own refusals (NUL byte, a name too long) surface here
    except (ValueError, OSError) as e:
        raise ApiError(400, f"path {rel[:200]!r}: not a usable path ({e})", param="run") from None
    if not target.is_relative_to(real_root):
        raise ApiError(403, f"path {rel!r} is outside the runs folder",
                       kind="permission_error", param="run")
    return target


def _read_text(path: Path, limit: int = MAX_TEXT) -> str | None:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read(limit)


def _read_json(path: Path):
    text = _read_text(path, MAX_TEXT * 16)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(422, f"{path.name}: not valid JSON (line {e.lineno}): {e.msg}") from None


def list_runs(root: Path) -> list[dict]:
    """Folders under root (links not followed, a few levels deep) holding a run's files."""
    real_root, found, now = root.resolve(), [], time.time()
    for here, dirs, files in os.walk(real_root):
        depth = len(Path(here).relative_to(real_root).parts)
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")
                         and depth < MAX_DEPTH)
        kinds = {"metrics": METRICS in files, "results": RESULTS in files,
                 "adapter": CONFIG_FILE in files}
        if any(kinds.values()):
            folder = Path(here)
            mtime = max((folder / f).stat().st_mtime for f in (METRICS, RESULTS, CONFIG_FILE)
                        if f in files)
            found.append({"path": folder.relative_to(real_root).as_posix() or ".",
                          "mtime": mtime, **kinds,
                          "status": run_status(folder, now) if kinds["metrics"] else None})
            if len(found) >= MAX_RUNS:
                break
    return sorted(found, key=lambda r: -r["mtime"])


def _metrics_rows(path: Path, limit: int = 4 << 20) -> list[dict]:
    """metrics.jsonl's rows (its last `limit` bytes: enough for the board's figures)."""
    if not path.is_file():
        return []
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - limit))
        text = f.read().decode("utf-8", errors="replace")
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a cut first line, or one still being written
        if isinstance(row, dict):
            rows.append(row)
    return rows


def run_status(folder: Path, now: float) -> dict:
    """A run's line on the board: finished (final and best eval loss), training (step of
    steps, ETA), stopped at a checkpoint (resumable), or neither."""
    rows = _metrics_rows(folder / METRICS)
    steps = [r for r in rows if isinstance(r.get("loss"), (int, float))]
    evals = [r["eval_loss"] for r in rows if isinstance(r.get("eval_loss"), (int, float))]
    out = {"step": steps[-1].get("step") if steps else None,
           "final_eval": evals[-1] if evals else None, "best_eval": min(evals, default=None)}
    if (folder / MANIFEST_FILE).is_file() and (_read_json(folder / MANIFEST_FILE) or {}).get(
            "training"):
        return {**out, "state": "finished"}
    metrics = folder / METRICS
    ended = bool(rows) and rows[-1].get("event") in ("paused", "stopped")  # progress.py
    if steps and not ended and metrics.is_file() and now - metrics.stat().st_mtime < STALE_S:
        recipe = folder / RECIPE
        total = _total_steps(_read_text(recipe)) if recipe.is_file() else None
        secs = sorted(r.get("seconds", 0) for r in steps[-10:])
        left = (total - out["step"]) if total else None
        eta = round(secs[len(secs) // 2] * left) if left is not None and secs else None
        return {**out, "state": "training", "total": total, "eta_s": eta}
    ckpts = [p for p in (folder / "checkpoints").glob("step-*") if p.name[5:].isdigit()]
    if ckpts:
        return {**out, "state": "stopped", "step": max(int(p.name[5:]) for p in ckpts)}
    return {**out, "state": "unfinished" if steps else "no steps yet"}


def _total_steps(recipe: str | None) -> int | None:
    try:
        raw = load_yaml(recipe or "", RECIPE) or {}
    except ConfigError:
        return None
    steps = (raw.get("train") or {}).get("steps") if isinstance(raw, dict) else None
    return steps if isinstance(steps, int) else None


def metrics_tail(path: Path, offset: int, file_id: str | None) -> dict:
    """The whole lines of metrics.jsonl from byte `offset` on (at most MAX_CHUNK bytes).

    `file_id` (inode and creation) tells the page when a resumed run rewrote the file: the
    answer then starts over from byte 0 with `reset: true`.
    """
    if not path.is_file():
        return {"rows": [], "offset": 0, "file_id": None, "reset": offset > 0, "more": False}
    st = path.stat()
    fid = f"{st.st_ino}-{st.st_dev}"
    reset = file_id not in (None, fid) or offset > st.st_size
    start = 0 if reset else offset
    with open(path, "rb") as f:
        f.seek(start)
        chunk = f.read(MAX_CHUNK)
    whole = chunk[:chunk.rfind(b"\n") + 1]  # a line still being written waits for next time
    rows = []
    for line in whole.decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a damaged line is skipped, not fatal to the page
        if isinstance(row, dict):
            rows.append(row)
    end = start + len(whole)
    return {"rows": rows, "offset": end, "file_id": fid, "reset": reset,
            "more": end < st.st_size and len(whole) > 0}


def run_summary(root: Path, rel: str) -> dict:
    """A run's manifest figures (once finished), recipe, model card, and its state: finished,
    or stopped at a checkpoint (with the command that resumes it), or running / not started."""
    manifest = _read_json(confined(root, rel, MANIFEST_FILE))
    manifest = manifest if isinstance(manifest, dict) else {}
    folder = confined(root, rel)
    steps = sorted(int(p.name[5:]) for p in (folder / "checkpoints").glob("step-*")
                   if p.name[5:].isdigit() and not p.is_symlink())
    state = {"finished": bool(manifest.get("training")), "checkpoint_step": steps[-1]
             if steps else None}
    if not state["finished"] and steps:
        state["resume"] = f"adapters train {rel}/{RECIPE} --resume"
    return {"training": manifest.get("training"), "base": manifest.get("base"),
            "recipe": _read_text(confined(root, rel, RECIPE)),
            "card": _read_text(confined(root, rel, CARD_FILE)), "state": state}


def prompt_mode(manifest: dict) -> dict:
    """How the page should send a prompt to an adapter: through the template it was trained
    with (prompt data), as chat messages (chat data), or as it is (text, unknown)."""
    data = ((manifest.get("recipe") or {}).get("data") or {}) if manifest else {}
    mode = PROMPT_MODES.get(data.get("format"), "raw")
    template = (data.get("prompt_template") or DEFAULT_TEMPLATE) if mode == "template" else None
    return {"mode": mode, "template": template}


def eval_results(root: Path, rel: str) -> list[dict]:
    """results.json's rows, each with at most 3 samples (texts cut to 500 characters)."""
    rows = _read_json(confined(root, rel, RESULTS))
    if not isinstance(rows, list):
        raise ApiError(404, f"no {RESULTS} in {rel!r} (write one with adapters eval --out)",
                       kind="not_found_error", param="run")
    out = []
    for r in rows:
        if isinstance(r, dict):
            samples = [{k: str(v)[:500] for k, v in s.items()}
                       for s in r.get("samples", [])[:3] if isinstance(s, dict)]
            out.append({**{k: v for k, v in r.items() if k != "samples"}, "samples": samples})
    return out


# ---- routes -------------------------------------------------------------------------------

def routes(root: str | Path | None, registry=None, limits=None) -> APIRouter:
    """The page and its JSON. root: the folder of runs and adapters (None: none to show);
    registry: the server's models (None: the page shows runs only); limits: the server's
    request limits (protocol.Limits), which the page's fields take."""
    root = Path(root) if root else None
    router = APIRouter()

    def need_root() -> Path:
        if root is None:
            raise ApiError(403, "no runs folder: start the server with --adapter-root DIR",
                           kind="permission_error")
        return root

    @router.get("/ui/api/info")
    async def info():
        return {"playground": registry is not None, "runs": root is not None,
                "base": registry.base_name if registry is not None else None,
                "root": root.name if root else None, "results_base": BASE_NAME,
                "higher_is_better": HIGHER_IS_BETTER,
                "train": root is not None and registry is not None,
                "limits": {"max_tokens": limits.max_new_tokens, "context": limits.context}
                if limits is not None else None}

    @router.get("/ui/api/models")
    async def models():
        """Each loaded adapter's prompt mode (and template), read from its manifest."""
        if registry is None:
            return {"models": []}
        return {"models": [{"id": name, **prompt_mode(_read_json(
            Path(registry.folder(name)) / MANIFEST_FILE) or {})} for name in registry.names()]}

    @router.get("/ui/api/runs")
    async def runs():
        return {"runs": list_runs(need_root())}

    @router.get("/ui/api/metrics")
    async def metrics(run: str, offset: int = 0, file_id: str | None = None):
        return metrics_tail(confined(need_root(), run, METRICS), max(offset, 0), file_id)

    @router.get("/ui/api/summary")
    async def summary(run: str):
        return run_summary(need_root(), run)

    @router.get("/ui/api/results")
    async def results(run: str):
        return {"rows": eval_results(need_root(), run)}

    @router.get("/ui/api/card")
    async def card(model: str):
        if registry is None or model not in registry.names():
            raise ApiError(404, f"no loaded adapter named {model!r}",
                           kind="not_found_error", param="model")
        return {"model": model, "card": _read_text(Path(registry.folder(model)) / CARD_FILE)}

    return router


def install(app: FastAPI, root: str | Path | None, registry=None, limits=None) -> None:
    """Add the page (at /) and its JSON routes to `app`; with a runs folder and a model, also
    training from the page (studio.py; app.state.studio, closed with the app)."""
    app.include_router(routes(root, registry, limits))
    if root is not None and registry is not None:
        app.state.studio = Studio(Path(root), base_settings(registry.model))
        app.include_router(studio_routes(app.state.studio))
    app.add_middleware(PageFiles)  # added last, so outermost: ahead of the app's Guard


def create_ui_app(root: str | Path, api_key: str | None = None) -> FastAPI:
    """The page over a runs folder, without a model (`adapters ui RUNS_DIR`)."""
    app = FastAPI(title="adapters ui")
    app.add_middleware(Guard, api_key=api_key, max_body=64 << 10)  # the API's key check

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse(error_body(e), status_code=e.status)

    install(app, root)
    return app
