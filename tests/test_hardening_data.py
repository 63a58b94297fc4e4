"""Hostile recipes and data (issue 22, items 11-13): alias bombs, tags, bad bytes, deep
nesting, FIFOs and folders in a glob, one huge JSONL line, a million CSV columns: each is one
clear line, fast, with bounded memory."""

import os
import threading
import time
import tracemalloc

import pytest
from conftest import run_cli

from adapters.config import load_recipe
from adapters.data.sources import MAX_LINE_CHARS, check_sources, read_rows
from adapters.errors import ConfigError, DataError


def _bomb(anchor_at: str) -> str:
    """A billion laughs: 10^9 strings once expanded, a few hundred bytes as written."""
    levels = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 9)]
    return "x-anchors:\n" + "".join(f"  {x}\n" for x in levels) + anchor_at


RECIPES = {
    "bomb in data.train": (_bomb("data:\n  train: *l8\n"), "alias bomb"),
    "bomb in lora.targets": (_bomb("lora:\n  targets: *l8\n"), "alias bomb"),
    "recursive alias": ("data:\n  train: &a [*a]\n", "recursive"),
    "10,000 levels": ("data:\n  train: " + "[" * 10_000 + "]" * 10_000 + "\n", "nested"),
    "block nesting": ("".join(" " * i + f"k{i}:\n" for i in range(1_000)), "nested"),
    "python tag": ("data:\n  train: !!python/object/apply:os.system [echo pwned]\n",
                   "no tags such as !!python"),
}


@pytest.mark.parametrize("case", list(RECIPES))
def test_a_hostile_recipe_is_one_fast_line(tmp_path, capsys, case):
    text, why = RECIPES[case]
    path = tmp_path / "r.yaml"
    path.write_text(text)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=why) as e:
        load_recipe(path)
    assert time.perf_counter() - t0 < 60  # a hang guard: the bombs ran ~50 s to MemoryError
    assert str(path) in str(e.value) and len(str(e.value)) < 400 and "\n" not in str(e.value)
    code, _, err = run_cli("data", "preview", path, capsys=capsys)
    assert code == 1 and err.count("\n") == 1 and why in err


def test_a_recipe_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model:\n  name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml:2: not UTF-8 \(byte offset 18\)"):
        load_recipe(path)


@pytest.mark.parametrize("override,why", [
    ("train.steps=!!python/object/apply:os.system [echo pwned]", "no tags such as !!python"),
    ("train.steps=[1,", "not valid YAML at line 1"),
    ("data.train=" + "[" * 5000, "nested more than"),
    ("data.train=" + "{a: &a [x, x]" + "".join(f", b{i}: &b{i} [*{'a' if i == 0 else f'b{i - 1}'}"
                                              f", *{'a' if i == 0 else f'b{i - 1}'}]"
                                              for i in range(40)) + "}", "alias bomb"),
])
def test_a_broken_override_is_one_line(tmp_path, capsys, override, why):
    with pytest.raises(ConfigError, match=why):
        load_recipe(None, [override])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  steps: 1\n")
    code, _, err = run_cli("data", "preview", recipe, override, capsys=capsys)
    assert code == 1 and err.count("\n") == 1 and "override" in err and why in err


def test_good_values_in_messages_stay_short(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  steps: [" + ", ".join(["x" * 1000] * 1000) + "]\n")
    with pytest.raises(ConfigError, match="train.steps: expected") as e:
        load_recipe(path)
    assert len(str(e.value)) < 400


# ---- 12. only regular files are read ----

def test_a_fifo_matched_by_a_glob_is_refused_not_waited_on(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "p", "completion": "c"}\n')
    fifo = tmp_path / "b.jsonl"
    os.mkfifo(fifo)
    done, result = threading.Event(), {}

    def read():
        try:
            result["rows"] = read_rows(str(tmp_path / "*.jsonl"))
        except Exception as e:  # noqa: BLE001 - the assertion below says what was raised
            result["error"] = e
        done.set()

    threading.Thread(target=read, daemon=True).start()
    finished = done.wait(30)
    if not finished:  # today's behaviour: blocked opening the FIFO; release it, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        done.wait(30)
    assert finished, "reading a glob that matches a FIFO hung"
    assert isinstance(result.get("error"), DataError), result
    assert "b.jsonl: a FIFO (named pipe), not a regular file" in str(result["error"])
    for spec in (str(fifo), str(tmp_path)):  # named directly, or inside a folder
        with pytest.raises(DataError, match="FIFO"):
            check_sources(spec)


def test_a_folder_matched_by_a_glob_is_named(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "p", "completion": "c"}\n')
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DataError, match="dir.jsonl: a folder, not a regular file"):
        read_rows(str(tmp_path / "*.jsonl"))
    assert len(read_rows(str(tmp_path / "a.jsonl"))[0]) == 1


# ---- 13. one record is bounded ----

def test_one_huge_jsonl_line_is_refused_in_bounded_memory(tmp_path):
    path = tmp_path / "huge.jsonl"
    size = 5 * MAX_LINE_CHARS  # 20 MB on one line
    with open(path, "w") as f:
        f.write('{"prompt": "p", "completion": "c"}\n{"prompt": "')
        f.write("x" * size)
        f.write('", "completion": "c"}\n')
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=rf"huge.jsonl:2: line longer than {MAX_LINE_CHARS}"):
            read_rows(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MAX_LINE_CHARS + (8 << 20), peak  # one line at most, never the file


def test_deeply_nested_jsonl_is_a_data_error(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(DataError, match="deep.jsonl:1: malformed JSON"):
        read_rows(str(path))


def test_a_million_csv_columns_names_the_first_few(tmp_path):
    path = tmp_path / "wide.csv"
    path.write_text(",".join(f"c{i}" for i in range(1_000_000)) + "\n1,2\n")
    with pytest.raises(DataError) as e:
        read_rows(str(path))
    msg = str(e.value)
    assert len(msg) < 400 and "wide.csv:1" in msg and "c0,c1,c2" in msg
    narrower = tmp_path / "narrower.csv"  # fits on one line, but too many columns
    narrower.write_text(",".join("c" for i in range(100_000)) + "\n1,2\n")
    with pytest.raises(DataError, match=r"narrower.csv:1: the header has 100000 columns \(c, "
                       r"c, c, c, c, \.\.\. \(100000 columns\)\)") as e:
        read_rows(str(narrower))
    assert len(str(e.value)) < 400
    ragged = tmp_path / "ragged.csv"
    ragged.write_text(",".join(f"c{i}" for i in range(5000)) + "\n1,2\n")
    with pytest.raises(DataError, match="ragged.csv:2: 2 fields, the header has 5000 "
                       r"\(c0, c1, c2, c3, c4, \.\.\. \(5000 columns\)\)") as e:
        read_rows(str(ragged))
    assert len(str(e.value)) < 400


def test_good_data_reads_as_before(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "p\u2028q", "completion": "c"}\r\n\n'
                                      '{"prompt": "r", "completion": "s"}\n')
    (tmp_path / "b.csv").write_text('prompt,completion\n"multi\nline",x\n')
    (tmp_path / "c.txt").write_text("one\r\ntwo\n\nthree")
    rows, files = read_rows(str(tmp_path))
    assert [r.data for r in rows] == [
        {"prompt": "p\u2028q", "completion": "c"}, {"prompt": "r", "completion": "s"},
        {"prompt": "multi\nline", "completion": "x"},
        {"text": "one"}, {"text": "two"}, {"text": "three"}]
    assert [r.where.rsplit("/", 1)[1] for r in rows] == [
        "a.jsonl:1", "a.jsonl:3", "b.csv:3", "c.txt:1", "c.txt:2", "c.txt:4"]
