"""train.report_to: the figures of metrics.jsonl and the recipe, read back with each tracker's
own reader (TensorBoard's EventAccumulator, MLflow's client, W&B's record protobufs)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import struct
from pathlib import Path

import pytest
from conftest import recipe

from adapters import train
from adapters.errors import ConfigError
from adapters.training.trackers import TRACKERS, check_report_to, figures, flat_recipe

EXTRA_MODULE = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def have(name: str) -> bool:
    return importlib.util.find_spec(EXTRA_MODULE[name]) is not None


def need(name: str) -> None:
    """Skip without the extra; under CI a missing extra is a failure."""
    if not have(name):
        msg = f"the {name} extra is not installed (pip install 'adapterkit[{name}]')"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as {figure: [(step, value), ...]}: what every tracker must hold."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in figures(row).items():
            out.setdefault(key, []).append((row["step"], value))
    return out


@pytest.fixture(scope="module")
def tracked(tiny_gpt2, tmp_path_factory):
    """One tiny real run (6 steps, eval at step 3 and at the end) reporting to every tracker
    that is installed."""
    names = [n for n in TRACKERS if have(n)]
    if not names:
        pytest.skip("none of the tracker extras is installed")
    tmp = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTERS_HOME", str(tmp / "home"))
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_MODE"):
            mp.delenv(var, raising=False)
        cfg = recipe(tiny_gpt2, tmp, "train.steps=6", "train.eval_every=3",
                     "data.eval_fraction=0.25", f"train.report_to=[{', '.join(names)}]")
        out = train(cfg)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return out, cfg, series(rows)


def test_the_figures_are_those_of_metrics_jsonl(tracked):
    _, _, want = tracked
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_bytes", "eval_loss"):
        assert key in want, key
    assert [s for s, _ in want["eval_loss"]] == [3, 6]
    assert [s for s, _ in want["loss"]] == [1, 2, 3, 4, 5, 6]


def test_tensorboard_holds_the_figures_and_the_recipe(tracked):
    need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out, cfg, want = tracked
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(want)
    for key, points in want.items():
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in points], key
        for (_, a), (_, b) in zip(got, points):
            assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12), (key, a, b)  # float32
    content = acc.PluginTagToContent("hparams")
    start = next(plugin_data_pb2.HParamsPluginData.FromString(v).session_start_info
                 for v in content.values()
                 if plugin_data_pb2.HParamsPluginData.FromString(v).HasField(
                     "session_start_info"))
    hp = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
          for k, v in start.hparams.items()}
    assert hp["train.lr"] == pytest.approx(cfg.train.lr)
    assert hp["model.name"] == cfg.model.name
    assert hp["train.report_to"] == json.dumps(cfg.train.report_to)


def test_mlflow_holds_the_figures_and_the_recipe(tracked):
    need("mlflow")
    from mlflow.tracking import MlflowClient

    out, cfg, want = tracked
    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve()}/mlflow.db")
    exp = client.get_experiment_by_name("adapters")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == out.name
    assert set(run.data.metrics) == set(want)
    for key, points in want.items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert got == points, key  # MLflow keeps doubles: exact
    assert run.data.params == {k: str(v) for k, v in flat_recipe(cfg.to_dict()).items()}


def wandb_records(path: Path) -> list:
    """The protobuf records of a W&B offline run file. wandb >= 0.19 ships no Python reader
    for its `.wandb` files, so the framing (a LevelDB-style log: 7-byte header ":W&B" + magic
    + version, 32 KiB blocks of [crc32, length, type] chunks) is read here; each record is
    decoded with wandb's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # padding to the end of the block
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
            buf = b""
    return records


def test_wandb_offline_run_holds_the_figures_and_the_recipe(tracked):
    need("wandb")
    out, cfg, want = tracked
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    got: dict[str, list[tuple[int, float]]] = {}
    config: dict = {}
    for rec in wandb_records(run_file):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in rec.history.item}
            for key, value in items.items():
                if not key.startswith("_"):  # wandb's own _step, _runtime, _timestamp
                    got.setdefault(key, []).append((items["_step"], value))
        elif kind in ("run", "config"):  # the run record carries the initial config
            update = rec.run.config.update if kind == "run" else rec.config.update
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                           for i in update})
    assert got == want
    recipe_dict = cfg.to_dict()
    for section, values in recipe_dict.items():
        assert config[section] == values, section


def test_an_unknown_tracker_is_named_with_the_fix():
    with pytest.raises(ConfigError, match=r"train.report_to: unknown tracker 'tensorbord' "
                                          r"\(did you mean 'tensorboard'\?\)"):
        check_report_to(["tensorbord"])
    check_report_to(list(TRACKERS))


def test_a_misspelled_tracker_stops_training_before_the_first_step(tiny_gpt2, tmp_path):
    cfg = recipe(tiny_gpt2, tmp_path, "train.steps=2", "train.report_to=[mlfow]")
    with pytest.raises(ConfigError, match="did you mean 'mlflow'"):
        train(cfg)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_no_tracker_by_default_writes_nothing_extra(tiny_gpt2, tmp_path):
    cfg = recipe(tiny_gpt2, tmp_path, "train.steps=2")
    assert cfg.train.report_to == []
    out = train(cfg)
    for name in ("tensorboard", "mlflow.db", "wandb"):
        assert not (out / name).exists(), name
