"""Training from the web page: one `adapters train` child process at a time, its files inside
the server's runs folder (`--adapter-root DIR`).

The page uploads a CSV / JSONL / text file (into DIR/uploads/, at most the server's body
limit) or picks a recipe from the repository's recipes/, sets rank, steps and learning rate,
and starts a run: the recipe it will train is written to DIR/NAME/studio-recipe.yaml (the
served base, its dtype and quantization, so the adapter loads into this server), and
`python -m adapters train DIR/NAME/studio-recipe.yaml` runs as a child in its own session with
its output in DIR/NAME/ (metrics.jsonl: the runs view shows it live) and its console in
DIR/NAME/train.log. Stop sends it SIGINT (it checkpoints and exits: resumable); Resume runs
the same recipe with --resume. The routes sit behind the API key like every /ui/api/ route.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Literal

import yaml
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from ..config import read_recipe
from ..errors import ConfigError
from ..io import atomic_write_bytes, atomic_write_text
from .protocol import ApiError

RECIPES = Path(__file__).resolve().parents[2] / "recipes"  # a source checkout's recipes/
UPLOADS = "uploads"
RECIPE_FILE, LOG_FILE = "studio-recipe.yaml", "train.log"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SUFFIXES = {".csv": "prompt_completion", ".jsonl": "prompt_completion", ".txt": "text"}


class TrainBody(BaseModel):
    name: str = Field(pattern=NAME.pattern)
    base: str | None = None  # None: the served base; "default"; or a model folder in the root
    recipe: str | None = None  # a file name in recipes/, or None: the fields below alone
    data: str | None = None  # an uploaded file: "uploads/NAME"
    format: Literal["prompt_completion", "text", "chat", "preference"] | None = None
    r: int = Field(8, ge=1, le=256, strict=True)
    steps: int = Field(30, ge=1, le=100_000, strict=True)
    lr: float = Field(2e-4, gt=0, le=1.0, allow_inf_nan=False)


def base_settings(model) -> dict:
    """The served base as a recipe's model section: trained on the same weights, dtype and
    quantization, the adapter passes this server's base check when loaded."""
    quant = "4bit" if getattr(model, "is_loaded_in_4bit", False) else (
        "8bit" if getattr(model, "is_loaded_in_8bit", False) else "none")
    dtype = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(
        str(model.dtype), "auto")
    return {"name": str(model.config._name_or_path), "dtype": dtype, "quantization": quant}


class Studio:
    """The page's one training run at a time (see the module docstring)."""

    def __init__(self, root: Path, base: dict):
        self.root, self.base = root.resolve(), base
        self.proc: subprocess.Popen | None = None
        self.name: str | None = None
        self.served_base = True  # the last run trains on the served base (loadable here)
        self.lock = threading.Lock()

    def recipes(self) -> list[str]:
        return sorted(p.name for p in RECIPES.glob("*.yaml")) if RECIPES.is_dir() else []

    def bases(self) -> list[str]:
        """What else a run may train on: the embedded default, and full models (config.json
        with weights, e.g. a merged adapter) in the runs folder. Adapters trained on another
        base than the served one cannot load here: the page says so."""
        found = [p.parent.relative_to(self.root).as_posix() for p in sorted(
            self.root.glob("*/config.json")) if not (p.parent / "adapter_config.json").exists()
            and list(p.parent.glob("model*.safetensors"))]
        return ["default", *found]

    def options(self) -> dict:
        uploads = self.root / UPLOADS
        files = sorted(p.name for p in uploads.iterdir() if p.is_file()) if uploads.is_dir() \
            else []
        return {"recipes": self.recipes(), "uploads": [f"{UPLOADS}/{f}" for f in files],
                "base": self.base, "bases": self.bases(), **self.status()}

    def upload(self, filename: str, data: bytes) -> str:
        """Write an uploaded data file into DIR/uploads/; returns its path in the root."""
        suffix = Path(filename).suffix.lower()
        if not NAME.fullmatch(filename) or suffix not in SUFFIXES:
            raise ApiError(400, f"file name {filename[:80]!r}: letters, digits, '.', '_' or "
                                f"'-', ending in {', '.join(SUFFIXES)}", param="filename")
        if not data.strip():
            raise ApiError(400, f"{filename}: the file is empty", param="filename")
        (self.root / UPLOADS).mkdir(exist_ok=True)
        atomic_write_bytes(self.root / UPLOADS / filename, data)
        return f"{UPLOADS}/{filename}"

    def start(self, body: TrainBody, resume: bool = False) -> dict:
        with self.lock:
            if self.running():
                raise ApiError(409, f"{self.name!r} is training; stop it first (one run at a "
                                    "time)", kind="conflict_error")
            out = self.root / body.name
            recipe = out / RECIPE_FILE
            if resume:
                if not recipe.is_file():
                    raise ApiError(404, f"no run {body.name!r} started from this page",
                                   kind="not_found_error", param="name")
            else:
                if out.exists() and any(out.iterdir()):
                    raise ApiError(409, f"{body.name!r} exists in the runs folder: pick another "
                                        "name, or resume it", kind="conflict_error",
                                   param="name")
                out.mkdir(parents=True, exist_ok=True)
                atomic_write_text(recipe, yaml.safe_dump(self._recipe(body, out), sort_keys=False))
            cmd = [sys.executable, "-m", "adapters", "train", str(recipe)] + (
                ["--resume"] if resume else [])
            with open(out / LOG_FILE, "ab") as log:  # the child keeps its own descriptor
                self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=log, stderr=log,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
            model = yaml.safe_load(recipe.read_text()).get("model") if resume else None
            self.name = body.name
            self.served_base = model == self.base if resume else body.base is None
            return self.status()

    def _recipe(self, body: TrainBody, out: Path) -> dict:
        raw: dict = {}
        if body.recipe:
            if body.recipe not in self.recipes():
                raise ApiError(400, f"recipe {body.recipe!r}: not one of recipes/ "
                                    f"({', '.join(self.recipes())})", param="recipe")
            try:
                raw = read_recipe(RECIPES / body.recipe)
            except ConfigError as e:
                raise ApiError(400, str(e), param="recipe") from None
        data = dict(raw.get("data") or {})
        if body.data:
            path = (self.root / body.data).resolve()
            if not (path.is_relative_to(self.root / UPLOADS) and path.is_file()):
                raise ApiError(400, f"data {body.data!r}: not an uploaded file "
                                    f"({UPLOADS}/NAME)", param="data")
            data.update(train=str(path), eval=None, eval_fraction=0.1,
                        format=body.format or SUFFIXES[path.suffix.lower()])
        elif not body.recipe:
            raise ApiError(400, "give a data file (upload one) or a recipe", param="data")
        else:
            data.update({k: self._recipe_data(body.recipe, data[k]) for k in ("train", "eval")
                         if isinstance(data.get(k), str)})
            if body.format:
                data["format"] = body.format
        train = {**(raw.get("train") or {}), "steps": body.steps, "lr": body.lr,
                 "eval_every": max(1, body.steps // 4), "save_every": max(1, body.steps // 4)}
        lora = {**(raw.get("lora") or {}), "r": body.r, "alpha": 2 * body.r}
        return {**raw, "model": self._model(body.base), "lora": lora, "data": data,
                "train": train, "output": {**(raw.get("output") or {}), "dir": str(out)}}

    def _model(self, base: str | None) -> dict:
        if base is None:
            return dict(self.base)
        if base not in self.bases():
            raise ApiError(400, f"base {base[:80]!r}: not one of {', '.join(self.bases())} "
                                "(or none: the served base)", param="base")
        return {"name": base if base == "default" else str(self.root / base), "dtype": "auto"}

    def _recipe_data(self, recipe: str, path: str) -> str:
        """A recipe's data path, relative to the checkout (as its recipes are written)."""
        p = Path(path)
        full = p if p.is_absolute() else RECIPES.parent / p
        if not full.exists():
            raise ApiError(400, f"recipe {recipe}: its data {path} is not on this machine "
                                "(`adapters data build` writes the demo's); upload a file "
                                "instead", param="recipe")
        return str(full)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> dict:
        if not self.running():
            raise ApiError(409, "no run is training", kind="conflict_error")
        self.proc.send_signal(signal.SIGINT)  # the run checkpoints, then exits (resumable)
        return self.status()

    def status(self) -> dict:
        if self.proc is None:
            return {"training": None, "last": None}
        code = self.proc.poll()
        state = ("training" if code is None else "finished" if code == 0 else
                 "stopped" if code in (130, -signal.SIGINT) else "failed")
        log = self.root / self.name / LOG_FILE
        tail = log.read_bytes()[-2000:].decode("utf-8", "replace") if log.exists() else ""
        return {"training": self.name if code is None else None,
                "last": {"name": self.name, "state": state, "exit_code": code, "log": tail,
                         "served_base": self.served_base}}

    def close(self) -> None:
        """Stop a child still training when the server stops (it checkpoints first)."""
        if self.running():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def studio_routes(studio: Studio) -> APIRouter:
    router = APIRouter()

    @router.get("/ui/api/train")
    async def options():
        return studio.options()

    @router.post("/ui/api/upload")
    async def upload(request: Request, filename: str):
        return {"path": studio.upload(filename, await request.body())}

    @router.post("/ui/api/train")
    async def start(body: TrainBody):
        return studio.start(body)

    @router.post("/ui/api/train/resume")
    async def resume(body: TrainBody):
        return studio.start(body, resume=True)

    @router.post("/ui/api/train/stop")
    async def stop():
        return studio.stop()

    return router
