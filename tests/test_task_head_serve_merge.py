"""Task-head adapters past training: `adapters merge` writes a plain *ForSequenceClassification
folder (checked on the head's outputs), and `adapters serve` answers POST /v1/classify."""

import json
import os
import re
import shutil
import subprocess
import sys

import openai
import pytest
import torch
from conftest import head_recipe, run_cli, toy_rows, trained_adapter, write_jsonl
from live_server import Running, http
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from adapters.config import BASE_NAME, DataConfig, ModelConfig
from adapters.eval.heads import predict
from adapters.merge import HeadVerification, MergeError, merge_adapter
from adapters.model import load_base
from adapters.serving.classify import Heads
from adapters.serving.registry import Registry
from adapters.serving.server import create_app
from adapters.training import train

TEXTS = [r["text"] for r in toy_rows(12, 3)]


@pytest.fixture(scope="module")
def regressor(tiny_llama, tmp_path_factory):
    """A regression adapter on tiny Llama, trained on the toy task (3.0 / -1.0)."""
    tmp = tmp_path_factory.mktemp("reg")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTERS_HOME", str(tmp / "home"))
        return train(head_recipe(tiny_llama, tmp, "train.steps=20", task="regression"))


def peft_logits(base, adapter, num_labels, texts):
    """(N, K) logits of plain transformers + peft on `texts` (right-padded, HF's pooling)."""
    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=num_labels, pad_token_id=tok.pad_token_id, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        return model(**tok(texts, return_tensors="pt", padding=True)).logits


def merged_logits(folder, texts):
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        return model.eval()(**tok(texts, return_tensors="pt", padding=True)).logits, model


# ---- merge -----------------------------------------------------------------------------------


def test_merged_classifier_loads_with_transformers_and_matches_peft(classifier, tiny_gpt2,
                                                                     tmp_path, capsys):
    out, _ = classifier
    code, text, err = run_cli("merge", out, "--out", tmp_path / "m", capsys=capsys)
    assert code == 0, err
    assert "verified: max head logit difference" in text and "same class on 100%" in text
    logits, model = merged_logits(tmp_path / "m", TEXTS)
    cfg = model.config
    assert type(model).__name__ == "GPT2ForSequenceClassification"
    assert cfg.num_labels == 2 and cfg.id2label == {0: "no", 1: "yes"}
    assert cfg.label2id == {"no": 0, "yes": 1}
    assert cfg.problem_type == "single_label_classification" and cfg.pad_token_id is not None
    assert not any("lora" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits, peft_logits(tiny_gpt2, out, 2, TEXTS),
                               rtol=1e-4, atol=1e-4)
    right = sum(cfg.id2label[int(i)] == r["label"] for i, r in zip(logits.argmax(-1),
                                                                   toy_rows(12, 3)))
    assert right >= 9  # the trained head came along, not a new one


def test_merged_regressor_on_llama_matches_peft_and_the_check_has_a_bound(regressor, tiny_llama,
                                                                         tmp_path):
    folder, check = merge_adapter(regressor, tmp_path / "m", data=TEXTS)
    assert isinstance(check, HeadVerification) and check.task == "regression"
    assert check.texts == len(TEXTS) and check.max_logit_diff < 1e-4
    logits, model = merged_logits(folder, TEXTS)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    torch.testing.assert_close(logits, peft_logits(tiny_llama, regressor, 1, TEXTS),
                               rtol=1e-4, atol=1e-4)
    # Above its bound the check refuses, says why, and writes nothing.
    with pytest.raises(MergeError, match=r"predicted value .* > -1.0\). Nothing was written"):
        merge_adapter(regressor, tmp_path / "n", data=TEXTS, max_diff=-1.0)
    assert not (tmp_path / "n").exists()


def test_classification_merge_check_uses_the_class_probabilities(classifier, tmp_path):
    out, _ = classifier
    with pytest.raises(MergeError, match="KL of the class probabilities .* > -1.0"):
        merge_adapter(out, tmp_path / "n", data=TEXTS[:2], max_kl=-1.0)
    assert not (tmp_path / "n").exists()


# ---- serve -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_server(tiny_gpt2, classifier, tmp_path_factory):
    """A server over tiny GPT-2: a causal LoRA `a0` and the classifier `cls` from the start,
    the classifier's folder also under --adapter-root for hot loads."""
    root = tmp_path_factory.mktemp("root")
    trained_adapter(tiny_gpt2, root / "a0")
    shutil.copytree(classifier[0], root / "cls")
    model, tok = load_base(ModelConfig(name=str(tiny_gpt2), dtype="fp32"))
    reg = Registry(model, tok)
    reg.load("a0", root / "a0")
    heads = Heads(str(tiny_gpt2), dtype="fp32", device="cpu")
    heads.load("cls", root / "cls")
    server = Running(create_app(reg, adapter_root=root, heads=heads))
    yield server
    server.close()


def classify(server, body):
    code, text = http("POST", server.url + "/v1/classify", body)
    return code, json.loads(text)


def test_classify_gives_the_labels_and_probabilities_of_predict_and_peft(gpt2_server, classifier,
                                                                        tiny_gpt2, tmp_path):
    out, _ = classifier
    code, r = classify(gpt2_server, {"model": "cls", "input": TEXTS})
    assert code == 200, r
    assert r["object"] == "list" and r["model"] == "cls"
    assert [d["index"] for d in r["data"]] == list(range(len(TEXTS)))
    data = write_jsonl(tmp_path / "new.jsonl", [{"text": t} for t in TEXTS])
    preds = predict(out, DataConfig(train=str(data)), dtype="fp32")  # `adapters predict`
    assert [d["label"] for d in r["data"]] == [p["prediction"] for p in preds]
    for d, p in zip(r["data"], preds):
        assert d["probabilities"].keys() == {"no", "yes"}
        for k in ("no", "yes"):
            assert d["probabilities"][k] == pytest.approx(p["probabilities"][k], abs=1e-5)
    probs = torch.softmax(peft_logits(tiny_gpt2, out, 2, TEXTS), -1)  # plain peft
    got = torch.tensor([[d["probabilities"]["no"], d["probabilities"]["yes"]] for d in r["data"]])
    torch.testing.assert_close(got, probs, rtol=1e-4, atol=1e-4)
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    assert r["usage"]["prompt_tokens"] == sum(len(tok(t)["input_ids"]) for t in TEXTS)
    code, one = classify(gpt2_server, {"model": "cls", "input": TEXTS[0]})  # a single string
    assert code == 200 and len(one["data"]) == 1 and one["data"][0]["label"] == preds[0][
        "prediction"]
    assert one["data"][0]["probabilities"]["yes"] == pytest.approx(
        r["data"][0]["probabilities"]["yes"], abs=1e-5)  # alone, or padded in a batch


def test_models_lists_task_heads_and_wrong_endpoints_are_clear_400s(gpt2_server):
    c = gpt2_server.client()
    models = {m.id: m for m in c.models.list()}
    assert set(models) == {BASE_NAME, "a0", "cls"} and models["cls"].root.endswith("cls")
    with pytest.raises(openai.BadRequestError, match="'cls' is a classification adapter .* "
                                                     "use POST /v1/classify"):
        c.completions.create(model="cls", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="/v1/chat/completions generates text"):
        c.chat.completions.create(model="cls", messages=[{"role": "user", "content": "x"}])
    for name in ("a0", BASE_NAME):
        code, r = classify(gpt2_server, {"model": name, "input": "x"})
        assert code == 400 and f"'{name}' is a causal LM" in r["error"]["message"]
        assert r["error"]["param"] == "model"
    code, r = classify(gpt2_server, {"model": "nope", "input": "x"})
    assert code == 404 and r["error"]["type"] == "not_found_error"


@pytest.mark.parametrize("body, message", [
    ({"model": "cls", "input": []}, "input is an empty list"),
    ({"model": "cls", "input": ["import x", "  "]}, r"input\[1\] is empty"),
    ({"model": "cls", "input": ""}, r"input\[0\] is empty"),
    ({"model": "cls", "input": ["import x"] * 2049}, "at most 2048"),
    ({"model": "cls", "input": [1]}, "input"),
    ({"model": "cls", "input": ["import x", "import " * 300]},  # the context: 256 positions
     r"input\[1\] is \d+ tokens; this server's limit is 256"),
    ({"model": "cls"}, "input: Field required"),
])
def test_bad_inputs_are_400s_in_the_servers_error_shape(gpt2_server, body, message):
    code, r = classify(gpt2_server, body)
    assert code == 400 and set(r["error"]) == {"message", "type", "param", "code"}
    assert re.search(message, r["error"]["message"]), r
    assert r["error"]["type"] == "invalid_request_error"


def test_hot_load_a_task_head_then_unload_it(gpt2_server):
    code, text = http("POST", gpt2_server.url + "/v1/adapters", {"name": "cls2", "path": "cls"})
    assert code == 200, text
    code, a = classify(gpt2_server, {"model": "cls", "input": TEXTS[:3]})
    code2, b = classify(gpt2_server, {"model": "cls2", "input": TEXTS[:3]})
    assert code == code2 == 200 and a["data"] == b["data"]  # the same adapter, twice
    # A causal adapter under a task head's name replaces it (and the other way round).
    assert http("POST", gpt2_server.url + "/v1/adapters", {"name": "cls2", "path": "a0"})[0] == 200
    assert classify(gpt2_server, {"model": "cls2", "input": "x"})[0] == 400
    assert http("POST", gpt2_server.url + "/v1/adapters", {"name": "cls2", "path": "cls"})[0] == 200
    assert classify(gpt2_server, {"model": "cls2", "input": "x"})[0] == 200
    assert http("DELETE", gpt2_server.url + "/v1/adapters/cls2")[0] == 200
    assert classify(gpt2_server, {"model": "cls2", "input": "x"})[0] == 404
    ids = [m.id for m in gpt2_server.client().models.list()]
    assert ids == [BASE_NAME, "a0", "cls"]


def test_regression_on_llama_hot_loaded_behind_an_api_key(regressor, tiny_llama,
                                                          tmp_path_factory):
    root = tmp_path_factory.mktemp("reg-root")
    shutil.copytree(regressor, root / "reg")
    model, tok = load_base(ModelConfig(name=str(tiny_llama), dtype="fp32"))
    server = Running(create_app(Registry(model, tok), adapter_root=root, api_key="sekret"))
    try:
        assert http("POST", server.url + "/v1/classify", {"model": "reg", "input": "x"})[0] == 401
        c = server.client("sekret")
        c.post("/adapters", cast_to=dict, body={"name": "reg", "path": "reg"})
        r = c.post("/classify", cast_to=dict, body={"model": "reg", "input": TEXTS})
        values = torch.tensor([[d["value"]] for d in r["data"]])
        assert list(r["data"][0]) == ["index", "value"]
        torch.testing.assert_close(values, peft_logits(tiny_llama, regressor, 1, TEXTS),
                                   rtol=1e-4, atol=1e-4)
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").post("/classify", cast_to=dict,
                                        body={"model": "reg", "input": "x"})
    finally:
        server.close()


def test_the_serve_command_takes_a_task_head_at_start(classifier, tmp_path, capsys):
    out, _ = classifier
    data = write_jsonl(tmp_path / "new.jsonl", [{"text": t} for t in TEXTS])
    code, _, err = run_cli("predict", out, "--data", data, "--out", tmp_path / "p.jsonl",
                           capsys=capsys)
    assert code == 0, err
    preds = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    env = {k: v for k, v in os.environ.items() if k != "ADAPTERS_API_KEY"}
    proc = subprocess.Popen([sys.executable, "-m", "adapters", "serve", "--adapter",
                             f"cls={out}", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url, models = None, ""
        for line in proc.stdout:  # the models, then the port uvicorn bound
            models = line if line.startswith("models:") else models
            if "Uvicorn running on" in line:
                url = line.split("running on ")[1].split()[0]
                break
        assert url and "'cls'" in models, models
        code, text = http("POST", url + "/v1/classify", {"model": "cls", "input": TEXTS})
        assert code == 200, text
        data = json.loads(text)["data"]  # the same dtype as predict's (auto): same answers
        assert [d["label"] for d in data] == [p["prediction"] for p in preds]
        for d, p in zip(data, preds):
            assert d["probabilities"]["yes"] == pytest.approx(p["probabilities"]["yes"],
                                                              abs=1e-2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
