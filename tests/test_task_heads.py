"""Task heads (model.task classification / regression): the label format, the loss in the
loop, save -> plain peft load, resume, 4-bit, eval metrics and predictions."""

import json

import pytest
import torch
from conftest import head_recipe, run_cli, toy_rows, write_jsonl
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from adapters.adapter import check_files, load_adapter
from adapters.config import DataConfig
from adapters.data import build
from adapters.data.labels import Targets
from adapters.data.packing import Batcher
from adapters.errors import ConfigError, DataError
from adapters.eval.heads import classification_metrics, regression_metrics
from adapters.heads import load_head_model, model_config_for, task_of
from adapters.training import train
from adapters.training.heads import predictions
from adapters.training.trainer import setup


def outputs(model, tok, dcfg, targets, packing):
    """(logits, targets) in file order, through the training loop's (packed) batches."""
    ds = build(dcfg, tok, targets=targets).train.dataset
    batcher = Batcher(ds, 8, 32, packing, tok.pad_token_id)
    logits, y = predictions(model, batcher.iter_all(), "cpu", torch.float32)
    order = torch.tensor([i for item in batcher.items for i in item])  # batch order
    return logits[order.argsort()], y[order.argsort()]


# ---- data ----------------------------------------------------------------------------------


def test_label_data_marks_the_last_token_and_maps_labels(tiny_tok, tmp_path):
    rows = [{"title": "a", "body": "import x", "y": "b"}, {"title": "c", "body": "d", "y": "a"},
            {"title": "e", "body": "return self", "y": "b"}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    dcfg = DataConfig(train=str(f), format="label", columns={"label": "y"},
                      prompt_template="{title}: {body}", packing=True)
    ds = build(dcfg, tiny_tok, targets=Targets("classification", ["a", "b"])).train.dataset
    assert ds["target"] == [1.0, 0.0, 1.0]
    assert tiny_tok.decode(ds["input_ids"][0]) == "a: import x"
    for ids, labels in zip(ds["input_ids"], ds["labels"]):
        assert [i for i, x in enumerate(labels) if x != -100] == [len(ids) - 1]
    batch = Batcher(ds, 1, 64, True, tiny_tok.eos_token_id).batch(0, 0)  # one packed row
    marks = (batch["labels"] != -100).nonzero().tolist()  # row-major: the targets' order
    ends = [sum(len(x) for x in ds["input_ids"][:i + 1]) - 1 for i in range(3)]
    assert marks == [[0, e] for e in ends] and batch["target"].tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(DataError, match="not one of the training labels"):
        build(dcfg, tiny_tok, targets=Targets("classification", ["a"]))


def test_recipe_errors_name_the_fix(tiny_gpt2, tmp_path):
    cfg = head_recipe(tiny_gpt2, tmp_path, "data.format=prompt_completion")
    with pytest.raises(ConfigError, match="data.format: label"):
        setup(cfg)
    cfg = head_recipe(tiny_gpt2, tmp_path, "model.task=causal_lm")
    with pytest.raises(ConfigError, match="model.task: classification or regression"):
        setup(cfg)
    with pytest.raises(DataError, match="model.num_labels=3"):
        setup(head_recipe(tiny_gpt2, tmp_path, "model.num_labels=3"))


def test_metrics_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    m = classification_metrics(logits, torch.tensor([0, 1, 1, 1]), 2)
    assert m["confusion"] == [[1, 0], [1, 2]] and m["accuracy"] == 0.75
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    r = regression_metrics(torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([1.0, 3.0, 3.0]))
    assert r["mse"] == pytest.approx(2 / 3) and r["mae"] == pytest.approx(2 / 3)
    assert r["r2"] == pytest.approx(1 - 2 / (4 / 3 * 2))


# ---- training, files, plain peft -----------------------------------------------------------


def test_classification_learns_and_plain_peft_gives_the_same_outputs(classifier, tiny_gpt2):
    out, cfg = classifier
    task = task_of(check_files(out))
    assert task.to_dict() == {"type": "classification", "num_labels": 2, "head": "score",
                              "labels": ["no", "yes"]}
    assert json.loads((out / "manifest.json").read_text())["task"] == task.to_dict()
    assert "## Task head" in (out / "README.md").read_text()
    header = load_file(out / "adapter_model.safetensors")
    assert header["base_model.model.score.weight"].shape == (2, 64)
    # ours, through the adapters loader and the packed batches of the training loop
    mcfg, labels = model_config_for(task, name=str(tiny_gpt2), dtype="fp32")
    base, tok = load_head_model(mcfg, labels)
    ours = load_adapter(base, out, tokenizer=tok)
    ev = DataConfig(train=cfg.data.eval, format="label", max_seq_len=32)
    logits, y = outputs(ours, tok, ev, Targets("classification", labels), packing=True)
    assert (logits.argmax(-1) == y.long()).float().mean() > 0.9
    # plain transformers + peft, none of our code: right-padded batch, HF's own pooling
    plain_base = AutoModelForSequenceClassification.from_pretrained(
        tiny_gpt2, num_labels=2, pad_token_id=tok.pad_token_id, dtype=torch.float32)
    plain = PeftModel.from_pretrained(plain_base, str(out)).eval()
    enc = tok([r["text"] for r in toy_rows(16, 1)], return_tensors="pt", padding=True)
    with torch.no_grad():
        theirs = plain(**enc).logits
    torch.testing.assert_close(theirs, logits, rtol=1e-4, atol=1e-4)
    padded, _ = outputs(ours, tok, ev, Targets("classification", labels), packing=False)
    torch.testing.assert_close(padded, logits, rtol=1e-4, atol=1e-4)


def test_regression_mse_falls_5x(tiny_llama, tmp_path):
    cfg = head_recipe(tiny_llama, tmp_path, "train.steps=40", task="regression")
    run = setup(cfg)
    before = predictions(run.model, run.eval_batcher.iter_all(), "cpu", torch.float32)
    out = train(cfg)
    assert task_of(check_files(out)).type == "regression"
    mcfg, _ = model_config_for(task_of(check_files(out)), name=str(tiny_llama), dtype="fp32")
    base, tok = load_head_model(mcfg, None)
    model = load_adapter(base, out, tokenizer=tok)
    after = predictions(model, run.eval_batcher.iter_all(), "cpu", torch.float32)
    mse_before = regression_metrics(*before)["mse"]
    mse_after = regression_metrics(*after)["mse"]
    assert mse_after * 5 < mse_before, (mse_before, mse_after)


def test_resume_is_exact(tiny_gpt2, tmp_path):
    extra = ("train.steps=6", "train.grad_accum=2", "train.save_every=3")
    full = train(head_recipe(tiny_gpt2, tmp_path / "a", *extra))
    cfg = head_recipe(tiny_gpt2, tmp_path / "b", *extra)
    train(cfg, stop_after=3)
    resumed = train(cfg, resume="latest")

    def losses(out):
        return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in x]
    assert len(losses(full)) == 6
    torch.testing.assert_close(losses(resumed), losses(full), rtol=1e-6, atol=1e-6)
    a, b = (load_file(o / "adapter_model.safetensors") for o in (full, resumed))
    assert a.keys() == b.keys() and "base_model.model.score.weight" in a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)


def test_4bit_base_trains_a_full_precision_head(tiny_llama, tmp_path):
    cfg = head_recipe(tiny_llama, tmp_path, "model.quantization=4bit", "train.steps=8")
    run = setup(cfg)
    head = run.model.get_base_model().score
    assert head.modules_to_save["default"].weight.dtype == torch.float32
    assert type(head.original_module) is torch.nn.Linear  # not quantized
    out = train(cfg)
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x]
    assert losses[-1] < losses[0]
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        assert f.get_slice("base_model.model.score.weight").get_dtype() == "F32"
    task = task_of(check_files(out))
    mcfg, labels = model_config_for(task, name=str(tiny_llama), quantization="4bit")
    base, tok = load_head_model(mcfg, labels)
    load_adapter(base, out, tokenizer=tok)  # the fingerprint leaves the new head out


# ---- eval and predict ----------------------------------------------------------------------


def test_eval_reports_accuracy_f1_confusion_against_the_untrained_head(classifier, tmp_path,
                                                                      capsys):
    out, cfg = classifier
    code, text, _ = run_cli("eval", "--adapter", f"cls={out}", "--data", cfg.data.eval,
                            "--format", "label", "--out", tmp_path / "ev", capsys=capsys)
    assert code == 0, text
    rows = {r["model"]: r for r in json.loads((tmp_path / "ev" / "results.json").read_text())}
    assert rows["cls"]["accuracy"] > 0.9 and rows["cls"]["macro_f1"] > 0.9
    assert rows["base"]["accuracy"] < rows["cls"]["accuracy"]
    assert sum(map(sum, rows["cls"]["confusion"])) == rows["cls"]["examples"] == 16
    assert "accuracy (higher is better)" in text and "confusion of cls" in text
    manifest = check_files(out)
    assert manifest.eval[0].adapter["accuracy"] == rows["cls"]["accuracy"]


def test_predict_writes_labels_and_probabilities(classifier, tmp_path, capsys):
    out, _ = classifier
    rows = toy_rows(10, 2)
    data = write_jsonl(tmp_path / "new.jsonl", [{"text": r["text"]} for r in rows])  # no label
    code, _, err = run_cli("predict", out, "--data", data, "--out", tmp_path / "p.jsonl",
                           capsys=capsys)
    assert code == 0, err
    preds = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [p["row"] for p in preds] == list(range(10))
    right = sum(p["prediction"] == r["label"] for p, r in zip(preds, rows))
    assert right >= 9
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in preds)


def test_streamed_merge_and_generate_refuse_a_task_head_clearly(classifier, tmp_path, capsys):
    """The in-memory merge and the server take task heads (test_task_head_serve_merge.py);
    the streamed merge and generation say what to use instead."""
    out, _ = classifier
    code, _, err = run_cli("merge", out, "--out", tmp_path / "m", "--stream", capsys=capsys)
    assert code == 1 and "classification adapter" in err and "leave out --stream" in err
    assert not (tmp_path / "m").exists()
    code, _, err = run_cli("generate", "--adapter", f"cls={out}", "--prompt", "x",
                           capsys=capsys)
    assert code == 1 and "classification adapter" in err and "/v1/classify" in err
