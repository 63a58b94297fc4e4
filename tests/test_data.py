"""Data pipeline: exact ids/labels, masking, packing isolation, errors, cache, preview."""

import csv
import re

import datasets
import pytest
import torch
import torch.nn.functional as F
from conftest import write_jsonl

from adapters.config import DataConfig, ModelConfig
from adapters.data import build
from adapters.data.packing import Batcher, collate_packed, pack_bins
from adapters.data.sources import expand, read_rows
from adapters.errors import DataError
from adapters.model import load_base

EOS = "<|endoftext|>"


def _csv(path, rows, header=("input", "output")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _build(tok, **kw):
    return build(DataConfig(**kw), tok, cache=False)


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_prompt_completion_exact_ids_and_labels(tiny_tok, tmp_path):
    f = _csv(tmp_path / "qa.csv", [("What is 2+2?", "4, of course.")])
    ds = _build(tiny_tok, train=str(f), prompt_template="Q: {prompt}\nA: ").train.dataset
    prompt, answer = enc(tiny_tok, "Q: What is 2+2?\nA: "), enc(tiny_tok, "4, of course.")
    eos = tiny_tok.eos_token_id
    assert ds[0]["input_ids"] == prompt + answer + [eos]
    assert ds[0]["labels"] == [-100] * len(prompt) + answer + [eos]


def test_two_turn_chat_trains_every_assistant_turn_with_eos(tiny_tok, tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."}]
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}])
    ds = _build(tiny_tok, train=str(f), format="chat").train.dataset
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    # ChatML fallback (the tiny tokenizer has no chat template), turns end with EOS.
    expected_text = ("<|im_start|>system\nBe brief." + EOS + "\n<|im_start|>user\nHi" + EOS
                     + "\n<|im_start|>assistant\nHello!" + EOS + "\n<|im_start|>user\nBye" + EOS
                     + "\n<|im_start|>assistant\nGoodbye." + EOS + "\n")
    assert tiny_tok.decode(ids) == expected_text
    trained = [t for t, lab in zip(ids, labels) if lab != -100]
    assert trained == enc(tiny_tok, "Hello!" + EOS) + enc(tiny_tok, "Goodbye." + EOS)
    assert labels == [t if t in trained and lab != -100 else -100 for t, lab in zip(ids, labels)]


def test_tokenizer_chat_template_is_used(tiny_tok_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tok_dir)
    tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% if m.role == "
                         "'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": [
        {"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]}])
    ds = _build(tok, train=str(f), format="chat").train.dataset
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    assert tok.decode(ids) == "<user>ping<assistant>pong" + EOS
    assert tok.decode([t for t, lab in zip(ids, labels) if lab != -100]) == "pong" + EOS


def test_alpaca_and_sharegpt_presets(tiny_tok, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "1 2", "output": "3"}])
    ds = _build(tiny_tok, train=str(a), format="alpaca").train.dataset
    text = tiny_tok.decode(ds[0]["input_ids"])
    assert text.startswith("### Instruction:\nAdd\n\n### Input:\n1 2")
    s = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}])
    ds = _build(tiny_tok, train=str(s), format="sharegpt").train.dataset
    trained = [t for t, lab in zip(ds[0]["input_ids"], ds[0]["labels"]) if lab != -100]
    assert tiny_tok.decode(trained) == "y" + EOS


def test_train_on_prompt_and_text_format(tiny_tok, tmp_path):
    f = _csv(tmp_path / "qa.csv", [("hello", "world")])
    ds = _build(tiny_tok, train=str(f), train_on_prompt=True).train.dataset
    assert ds[0]["labels"][1:] == ds[0]["input_ids"][1:] and ds[0]["labels"][0] == -100
    t = tmp_path / "doc.txt"
    t.write_text("line one\n\nline two\n")
    split = _build(tiny_tok, train=str(t), format="text").train
    assert split.stats["examples"] == 2


def test_unicode_passes_through_unchanged(tiny_tok, tmp_path):
    rows = [("什么是高血压？", "高血压是指血压持续升高。🙂"), ("ما هو الضغط؟", "ارتفاع ضغط الدم")]
    f = _csv(tmp_path / "zh.csv", rows)
    ds = _build(tiny_tok, train=str(f)).train.dataset
    for (q, a), ex in zip(rows, ds):
        assert tiny_tok.decode(ex["input_ids"]) == f"{q}\n{a}{EOS}"


def test_overlong_truncate_keeps_prompt_drop_counts(tiny_tok, tmp_path):
    long_answer = " ".join(["word"] * 200)
    f = _csv(tmp_path / "qa.csv", [("short question", long_answer), ("q", "a")])
    split = _build(tiny_tok, train=str(f), max_seq_len=32).train
    ex = split.dataset[0]
    assert len(ex["input_ids"]) == 32 and ex["truncated"]
    assert ex["input_ids"][:len(enc(tiny_tok, "short question\n"))] == enc(tiny_tok,
                                                                          "short question\n")
    assert split.stats["truncated"] == 1
    split = _build(tiny_tok, train=str(f), max_seq_len=32, overlong="drop").train
    assert split.stats["dropped"] == 1 and split.stats["examples"] == 1
    # A prompt longer than the window still leaves trainable tokens.
    g = _csv(tmp_path / "g.csv", [(long_answer, "the answer")])
    ex = _build(tiny_tok, train=str(g), max_seq_len=32).train.dataset[0]
    assert len(ex["input_ids"]) <= 32 and any(x != -100 for x in ex["labels"])


def test_long_text_is_chunked_not_lost(tiny_tok, tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": " ".join(["token"] * 300)}])
    split = _build(tiny_tok, train=str(f), format="text", max_seq_len=64).train
    assert split.stats["examples"] > 1 and split.stats["max_len"] <= 64


def test_empty_completions_are_skipped_and_counted(tiny_tok, tmp_path):
    f = _csv(tmp_path / "qa.csv", [("q1", "a1"), ("q2", ""), ("q3", "   ")])
    split = _build(tiny_tok, train=str(f)).train
    assert split.stats["examples"] == 1 and split.stats["skipped"] == {"empty completion": 2}


def test_eval_fraction_is_deterministic_and_disjoint(tiny_tok, tmp_path):
    f = _csv(tmp_path / "qa.csv", [(f"q{i}", f"a{i}") for i in range(50)])
    a = build(DataConfig(train=str(f), eval_fraction=0.2), tiny_tok, seed=3, cache=False)
    b = build(DataConfig(train=str(f), eval_fraction=0.2), tiny_tok, seed=3, cache=False)
    ev = {tuple(x) for x in a.eval.dataset["input_ids"]}
    tr = {tuple(x) for x in a.train.dataset["input_ids"]}
    assert len(ev) == 10 and not ev & tr
    assert ev == {tuple(x) for x in b.eval.dataset["input_ids"]}


def test_many_files_folders_and_globs(tiny_tok, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    _csv(d / "a.csv", [("q1", "a1")])
    write_jsonl(d / "b.jsonl", [{"input": "q2", "output": "a2"}])
    assert _build(tiny_tok, train=str(d)).train.stats["rows"] == 2
    assert _build(tiny_tok, train=str(d / "*.csv")).train.stats["rows"] == 1
    assert _build(tiny_tok, train=[str(d / "a.csv"), str(d / "b.jsonl")]).train.stats["rows"] == 2


# ---- errors: each names the file, the line/row and what was expected ----

def test_missing_file_and_unknown_extension(tiny_tok, tmp_path):
    with pytest.raises(DataError, match="nope.csv: data file not found"):
        _build(tiny_tok, train=str(tmp_path / "nope.csv"))
    (tmp_path / "x.xlsx").write_text("?")
    with pytest.raises(DataError, match=r"x.xlsx: unknown extension '.xlsx'"):
        _build(tiny_tok, train=str(tmp_path / "x.xlsx"))


def test_malformed_jsonl_names_line(tiny_tok, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"input": "a", "output": "b"}\n{"input": "a", \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        _build(tiny_tok, train=str(f))


def test_malformed_csv_names_line(tiny_tok, tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text('input,output\nq1,a1\nq2,a2,extra\n')
    with pytest.raises(DataError, match=r"bad.csv:3: 3 fields, the header has 2"):
        _build(tiny_tok, train=str(f))


def test_invalid_utf8_names_byte_offset(tiny_tok, tmp_path):
    f = tmp_path / "latin1.csv"
    f.write_bytes(b"input,output\nq,caf" + b"\xe9\n")
    with pytest.raises(DataError, match=r"latin1.csv:2: invalid UTF-8 at byte offset 18"):
        _build(tiny_tok, train=str(f))


def test_missing_columns_show_found_and_the_fix(tiny_tok, tmp_path):
    f = _csv(tmp_path / "qa.csv", [("q", "a")], header=("question", "answer"))
    with pytest.raises(DataError) as e:
        _build(tiny_tok, train=str(f))
    msg = str(e.value)
    assert "qa.csv:2" in msg and "['question', 'answer']" in msg and "data.columns" in msg
    ok = _build(tiny_tok, train=str(f), columns={"prompt": "question", "completion": "answer"})
    assert ok.train.stats["examples"] == 1


def test_unknown_chat_role(tiny_tok, tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(DataError, match=r"c.jsonl:1: message 0 has unknown role 'robot'"):
        _build(tiny_tok, train=str(f), format="chat")


def test_empty_dataset_and_all_dropped(tiny_tok, tmp_path):
    f = _csv(tmp_path / "empty.csv", [])
    with pytest.raises(DataError, match="empty"):
        _build(tiny_tok, train=str(f))
    g = _csv(tmp_path / "long.csv", [(" ".join(["w"] * 100), "a")])
    with pytest.raises(DataError, match="every example was dropped"):
        _build(tiny_tok, train=str(g), max_seq_len=16, overlong="drop")


@pytest.mark.parametrize("hub_id", ["someuser/somedataset", "someuser/some.dataset-v1.1"])
@pytest.mark.parametrize("env", [("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "true")])
def test_hub_id_offline_names_the_id_at_once(hub_id, env, tiny_tok, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv(*env)
    monkeypatch.chdir(tmp_path)  # no local someuser/ folder

    def boom(*a, **k):
        raise AssertionError("the hub was contacted while offline")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    msg = rf"data.train: {re.escape(hub_id)}: not a local file .* the hub is offline"
    with pytest.raises(DataError, match=msg):
        _build(tiny_tok, train=hub_id)
    with pytest.raises(DataError, match=re.escape(hub_id) + ".*offline"):
        read_rows(hub_id)
    local = _csv(tmp_path / "qa.csv", [("q", "a")])
    with pytest.raises(DataError, match="data.eval: .*offline"):  # in a list or as eval too
        _build(tiny_tok, train=[str(local)], eval=hub_id)


def test_a_missing_file_with_a_data_extension_is_not_a_hub_id(tiny_tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="data/qa.csv: data file not found"):
        _build(tiny_tok, train="data/qa.csv")


def test_hub_id_online_loads_through_datasets(tiny_tok, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_dict({"input": ["What is 1+1?", "What is 2+2?"],
                                           "output": ["2", "4"]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    local = _csv(tmp_path / "qa.csv", [("q", "a")])
    bundle = _build(tiny_tok, train=["someuser/somedataset", str(local)])
    assert calls == [("someuser/somedataset", "train")]
    assert bundle.train.stats["rows"] == 3 and bundle.train.stats["examples"] == 3
    assert tiny_tok.decode(bundle.train.dataset[0]["input_ids"]) == f"What is 1+1?\n2{EOS}"
    # A hub id names no local file: the manifest's file list (expand) skips it, not fails.
    assert expand(["someuser/somedataset", str(local)]) == [local]


# ---- packing ----

def test_collate_packed_exact_tensors():
    b = collate_packed([[([5, 6, 7], [-100, 6, 7]), ([8, 9], [-100, 9])], [([4], [-100])]],
                       pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 0, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100] * 5]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 0, 0, 0]]
    m = b["attention_mask"][0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0],
                 [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert int(b["n_tokens"]) == 6


def test_pack_bins_fill_and_cover():
    lengths = [5, 3, 8, 2, 7, 1, 4]
    bins = pack_bins(lengths, 8)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert all(sum(lengths[i] for i in b) <= 8 for b in bins)
    assert len(bins) == 4  # 30 tokens in rows of 8: the minimum


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_loss_equals_alone(arch, tiny_gpt2, tiny_llama, tiny_tok, tmp_path):
    path = {"gpt2": tiny_gpt2, "llama": tiny_llama}[arch]
    model, _ = load_base(ModelConfig(name=str(path), dtype="fp32"))
    rows = [(f"question number {i} " * (i + 1), f"answer {i}") for i in range(6)]
    ds = _build(tiny_tok, train=str(_csv(tmp_path / "qa.csv", rows))).train.dataset
    bins = pack_bins([len(x) for x in ds["input_ids"]], 128)
    assert any(len(b) > 1 for b in bins)
    with torch.no_grad():
        for b in bins:
            batch = collate_packed([[(ds[i]["input_ids"], ds[i]["labels"]) for i in b]], 0)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"]).logits[0]
            t = 0
            for i in b:
                ids, lab = torch.tensor(ds[i]["input_ids"]), torch.tensor(ds[i]["labels"])
                solo = model(ids[None]).logits[0]
                n = len(ids)
                packed_loss = F.cross_entropy(logits[t:t + n - 1], lab[1:])
                solo_loss = F.cross_entropy(solo[:-1], lab[1:])
                torch.testing.assert_close(packed_loss, solo_loss, atol=1e-5, rtol=0)
                t += n


def test_padding_goes_to_the_longest_in_batch(tiny_tok, tmp_path):
    f = _csv(tmp_path / "qa.csv", [("a", "b"), ("a longer question here", "c")])
    ds = _build(tiny_tok, train=str(f), max_seq_len=512, packing=False).train.dataset
    b = Batcher(ds, 2, 512, packing=False, pad_id=0).batch(0, 0)
    assert b["input_ids"].shape[1] == max(len(x) for x in ds["input_ids"]) < 512


# ---- caching and preview ----

def test_large_csv_tokenises_once_then_hits_cache(tiny_tok, tmp_path, monkeypatch):
    import time

    import adapters.data.tokenize as tk

    rows = [(f"What does function_{i} do?", f"It returns {i} squared, which is {i * i}.")
            for i in range(10_000)]
    f = _csv(tmp_path / "big.csv", rows)
    t = time.perf_counter()
    first = build(DataConfig(train=str(f)), tiny_tok)
    print(f"10k rows tokenised in {time.perf_counter() - t:.1f}s")
    assert first.train.stats["examples"] == 10_000 and tk.cache_files()

    def boom(*a, **k):
        raise AssertionError("tokenised again instead of using the cache")

    monkeypatch.setattr(tk, "_encode_batch", boom)
    second = build(DataConfig(train=str(f)), tiny_tok)
    assert second.train.stats == first.train.stats


def test_preview_marks_loss_tokens(tiny_gpt2, tmp_path):
    from adapters.config import load_recipe
    from adapters.data.preview import preview

    f = _csv(tmp_path / "qa.csv", [("What is 2+2?", "Four."), ("Capital of France?", "Paris.")])
    cfg = load_recipe(None, [f"model.name={tiny_gpt2}", f"data.train={f}"])
    text = preview(cfg, n=2)
    assert "What is 2+2?\n[[Four.<|endoftext|>]]" in text
    assert "Capital of France?\n[[Paris.<|endoftext|>]]" in text
    assert "trainable_tokens" in text and "packing_efficiency" in text
    assert "\x1b[1;32mFour." in preview(cfg, n=1, color=True)
