"""The web page: its JSON over real runs (uvicorn on loopback), its confinement to the runs
folder, its API key, and the page itself in a real headless Chromium driven by Selenium."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import qa_csv, recipe, trained_adapter
from live_server import Running as LiveServer
from live_server import wait_until

from adapters import train
from adapters.config import DataConfig, ModelConfig
from adapters.eval import evaluate, write_results
from adapters.model import load_base
from adapters.serving.registry import Registry
from adapters.serving.server import create_app
from adapters.serving.ui import WEB, create_ui_app

KEY = "sekret-key"


def http(url: str, key: str | None = None, body: dict | None = None) -> tuple[int, Any, str]:
    """(status, headers, text) of a GET (or a JSON POST) with the standard library."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = None
    if body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


class Running(LiveServer):
    """The real server on loopback, with the page's key by default."""

    def get(self, path: str, key: str | None = KEY):
        return http(self.url + path, key)

    def stop(self) -> None:
        self.close()


@pytest.fixture
def ui(tmp_path):
    """`adapters ui` over tmp_path/runs (with an API key), served for real."""
    root = tmp_path / "runs"
    root.mkdir()
    srv = Running(create_ui_app(root, api_key=KEY))
    yield srv, root
    srv.stop()


def metrics_line(step: int, loss: float) -> str:
    return json.dumps({"step": step, "loss": loss, "lr": 1e-3, "finite": True}) + "\n"


def test_metrics_tail_reads_whole_lines_and_starts_over_when_rewritten(ui):
    srv, root = ui
    (root / "r1").mkdir()
    path = root / "r1" / "metrics.jsonl"
    path.write_text(metrics_line(1, 3.0) + metrics_line(2, 2.5) + '{"step": 3, "lo')
    code, _, text = srv.get("/ui/api/metrics?run=r1")
    first = json.loads(text)
    assert code == 200 and [r["step"] for r in first["rows"]] == [1, 2]
    assert first["offset"] == len(metrics_line(1, 3.0) + metrics_line(2, 2.5))
    with open(path, "a") as f:  # the half-written line ends, another follows
        f.write('ss": 2.25}\n' + metrics_line(4, 2.0))
    q = f"/ui/api/metrics?run=r1&offset={first['offset']}&file_id={first['file_id']}"
    second = json.loads(srv.get(q)[2])
    assert [r["step"] for r in second["rows"]] == [3, 4] and not second["reset"]
    assert second["rows"][0]["loss"] == 2.25
    # A resumed run rewrites the file (a new inode): the page is told to start over.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(metrics_line(1, 3.0))
    os.replace(tmp, path)
    q = f"/ui/api/metrics?run=r1&offset={second['offset']}&file_id={second['file_id']}"
    third = json.loads(srv.get(q)[2])
    assert third["reset"] and [r["step"] for r in third["rows"]] == [1]


def test_every_read_stays_inside_the_runs_folder(ui, tmp_path):
    srv, root = ui
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "metrics.jsonl").write_text(metrics_line(1, 9.0))
    (outside / "manifest.json").write_text("{}")
    (root / "inside").mkdir()
    (root / "inside" / "metrics.jsonl").write_text(metrics_line(1, 1.0))
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "inside2").mkdir()
    for name in ("metrics.jsonl", "manifest.json"):  # files linked to ones outside
        (root / "inside2" / name).symlink_to(outside / name)
    runs = json.loads(srv.get("/ui/api/runs")[2])["runs"]
    assert {r["path"] for r in runs} == {"inside", "inside2"}  # links to folders not followed
    for bad in ("../secret", "linked", "inside2", str(outside), "inside/../../secret"):
        for route in ("metrics", "summary", "results"):
            code, _, text = srv.get(f"/ui/api/{route}?run={urllib.request.quote(bad)}")
            if (bad, route) == ("inside2", "results"):  # no results.json there, linked or not
                assert code == 404, text
                continue
            assert code == 403, (route, bad, text)
            err = json.loads(text)["error"]
            assert err["type"] == "permission_error" and "outside the runs folder" in err["message"]
    assert json.loads(srv.get("/ui/api/metrics?run=inside")[2])["rows"][0]["loss"] == 1.0
    for bad in ("a\x00b", "x" * 5000):  # paths the OS refuses: a 400, not a 500
        code, _, text = srv.get(f"/ui/api/metrics?run={urllib.request.quote(bad)}")
        assert code == 400 and "not a usable path" in json.loads(text)["error"]["message"], text


def test_the_page_is_public_and_its_data_needs_the_key(ui):
    srv, root = ui
    code, headers, html = srv.get("/", key=None)
    assert code == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    for asset, kind in (("/ui/app.js", "text/javascript"), ("/ui/style.css", "text/css")):
        code, headers, _ = srv.get(asset, key=None)
        assert code == 200 and headers["Content-Type"].startswith(kind)
    for path in ("/ui/api/info", "/ui/api/runs", "/ui/api/metrics?run=x"):
        code, _, text = srv.get(path, key=None)
        assert code == 401 and json.loads(text)["error"]["type"] == "authentication_error"
        assert srv.get(path, key="wrong")[0] == 401
    assert srv.get("/ui/api/runs")[0] == 200
    assert srv.get("/ui/secrets.txt", key=None)[0] == 401  # not a page file: the key applies
    info = json.loads(srv.get("/ui/api/info")[2])
    assert info["playground"] is False and info["runs"] is True


def test_the_page_loads_nothing_from_elsewhere():
    html = (WEB / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and all(r.startswith(("/ui/", "#")) for r in refs), refs
    for name in ("index.html", "app.js", "style.css"):
        text = (WEB / name).read_text()
        assert not re.search(r"https?://|//cdn|@import", text), name


def test_summary_and_eval_results_of_real_runs(ui, tiny_gpt2):
    srv, root = ui
    out = train(recipe(tiny_gpt2, root / "run", "train.steps=3",
                       f"output.dir={root / 'run' / 'out'}"))
    manifest = json.loads((out / "manifest.json").read_text())
    runs = {r["path"]: r for r in json.loads(srv.get("/ui/api/runs")[2])["runs"]}
    assert runs["run/out"]["metrics"] and runs["run/out"]["adapter"]
    summary = json.loads(srv.get("/ui/api/summary?run=run/out")[2])
    assert summary["training"] == manifest["training"]
    assert summary["recipe"] == (out / "recipe.resolved.yaml").read_text()
    assert summary["card"] == (out / "README.md").read_text()
    data = DataConfig(train=str(qa_csv(root / "qa.csv", 8)), max_seq_len=64)
    rows = evaluate(str(tiny_gpt2), {"run": out}, {"qa": data}, dtype="fp32", generate=2,
                    max_new_tokens=8)
    write_results(rows, root / "eval")
    got = json.loads(srv.get("/ui/api/results?run=eval")[2])["rows"]
    assert [{k: v for k, v in r.items() if k != "samples"} for r in got] == \
        [{k: v for k, v in r.items() if k != "samples"} for r in rows]
    assert got[1]["samples"][0]["answer"] == rows[1]["samples"][0]["answer"][:500]
    assert srv.get("/ui/api/results?run=run/out")[0] == 404


def test_adapters_ui_command_serves_the_page(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "adapters", "ui", str(tmp_path), "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        assert f"http://127.0.0.1:{port}/" in proc.stdout.readline()
        code, _, html = wait_until(lambda: _try_get(f"http://127.0.0.1:{port}/"),
                                   what="adapters ui answering")
        assert code == 200 and "<title>adapters</title>" in html
        assert _try_get(f"http://127.0.0.1:{port}/ui/api/runs")[0] == 200  # no key set
    finally:
        proc.terminate()
        proc.wait(60)


def _try_get(url: str):
    try:
        return http(url)
    except OSError:  # not listening yet
        return None


# ---- the page in a real browser -----------------------------------------------------------

def _browser():
    """Selenium + Debian's chromium and chromium-driver; skip without them (fail under CI)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        chromium = None
    if not (chromium and driver):
        msg = ("the browser test needs selenium (dev extra) and Debian's chromium and "
               "chromium-driver (apt-get install chromium chromium-driver)")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1100", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts)


def _keep(driver, tmp_path: Path, name: str) -> Path:
    """A screenshot under the test's tmp dir, and in $CI_ARTIFACTS when set."""
    path = tmp_path / name
    assert driver.save_screenshot(str(path)), name
    if os.environ.get("CI_ARTIFACTS"):
        Path(os.environ["CI_ARTIFACTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(os.environ["CI_ARTIFACTS"]) / name)
    return path


def _train_in_thread(cfg, **kw) -> threading.Thread:
    errors: list[BaseException] = []

    def work():
        try:
            train(cfg, **kw)
        except BaseException as e:  # noqa: BLE001 (reported by the test)
            errors.append(e)

    t = threading.Thread(target=work, daemon=True)
    t.errors = errors
    t.start()
    return t


def test_the_page_in_a_real_browser(tiny_gpt2, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    driver = _browser()
    root = tmp_path / "root"
    trained_adapter(tiny_gpt2, root / "a1", seed=1)
    trained_adapter(tiny_gpt2, root / "a2", seed=2)
    cfg = recipe(tiny_gpt2, tmp_path / "data", "train.steps=9", "train.eval_every=3",
                 "data.eval_fraction=0.25", f"output.dir={root / 'run1'}")
    train(cfg, stop_after=3)  # a run paused at step 3; it goes on while the page watches
    train(recipe(tiny_gpt2, tmp_path / "grpo-data", "train.steps=2", "train.objective=grpo",
                 "grpo.rewards=[token_f1, length_penalty]", "grpo.max_completion_length=6",
                 "grpo.num_generations=2", "train.eval_every=1", "data.eval_fraction=0.25",
                 f"output.dir={root / 'grpo1'}"))
    model, tok = load_base(ModelConfig(name=str(tiny_gpt2), dtype="fp32"))
    reg = Registry(model, tok)
    reg.load("a1", root / "a1")
    srv = Running(create_app(reg, adapter_root=root, api_key=KEY))
    find = driver.find_element
    try:
        driver.get(srv.url + "/")
        key = wait_until(lambda: find(By.ID, "api-key").is_displayed() and find(By.ID, "api-key"),
                         what="the key field")
        key.send_keys(KEY, Keys.ENTER)
        wait_until(lambda: driver.execute_script("return document.body.dataset.ready"),
                   what="page ready")
        # Load a2 from the adapter root through the page's form (POST /v1/adapters).
        Select(find(By.ID, "load-path")).select_by_visible_text("a2")
        assert find(By.ID, "load-name").get_attribute("value") == "a2"
        find(By.ID, "load").click()
        wait_until(lambda: "a2" in reg.names() and driver.find_elements(
            By.CSS_SELECTOR, "#model-list input[value='a2']"), what="a2 loaded")
        boxes = {b.get_attribute("value"): b.is_selected()
                 for b in driver.find_elements(By.CSS_SELECTOR, "#model-list input")}
        assert boxes == {"base": False, "a1": True, "a2": True}
        prompt = find(By.ID, "prompt")
        prompt.send_keys("def add(a, b):")
        prompt.send_keys(Keys.CONTROL, Keys.ENTER)  # the keyboard shortcut sends it
        done = wait_until(lambda: len(driver.find_elements(
            By.CSS_SELECTOR, ".answer[data-state='done']")) == 2 and driver.find_elements(
            By.CSS_SELECTOR, ".answer"), what="both answers streamed")
        shown = {c.get_attribute("data-model"): c.find_element(By.CSS_SELECTOR, ".text").text
                 for c in done}
        # The same answers through the API without streaming (greedy: temperature 0).
        for name in ("a1", "a2"):
            code, _, text = http(srv.url + "/v1/completions", KEY, {
                "model": name, "prompt": "def add(a, b):", "max_tokens": 64,
                "temperature": 0})
            assert code == 200, text
            assert shown[name] == json.loads(text)["choices"][0]["text"].strip(), name
        assert shown["a1"] and shown["a1"] != shown["a2"]
        assert not find(By.ID, "key-form").is_displayed()  # the key was taken
        _keep(driver, tmp_path, "ui-playground.png")
        # The model card of a1, in a dialog that Escape closes.
        find(By.CSS_SELECTOR, "button[aria-label='Model card of a1']").click()
        dialog = find(By.ID, "card-dialog")
        wait_until(dialog.is_displayed, what="card dialog")
        card_md = (root / "a1" / "README.md").read_text()
        heading = wait_until(lambda: find(By.CSS_SELECTOR, "#card-text h3").text,
                             what="the card's title rendered")
        assert f"# {heading}\n" in card_md  # markdown rendered: its title as a heading
        _keep(driver, tmp_path, "ui-card.png")
        dialog.send_keys(Keys.ESCAPE)
        wait_until(lambda: not dialog.is_displayed(), what="card dialog closed")

        # Runs, reached with the keyboard (ArrowRight on the tab list).
        find(By.ID, "tab-play").send_keys(Keys.ARROW_RIGHT)
        assert find(By.ID, "tab-runs").get_attribute("aria-selected") == "true"
        wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, "button.run[data-path='run1']"),
                   what="run1 listed").pop().click()
        figure = find(By.ID, "loss-figure")
        points = lambda: (figure.get_attribute("data-points"),  # noqa: E731
                          figure.get_attribute("data-eval-points"))
        wait_until(lambda: points() == ("3", "1"), what="3 steps and an eval loss drawn")
        for stop_after, want in ((3, ("6", "2")), (None, ("9", "3"))):
            t = _train_in_thread(cfg, resume="latest", stop_after=stop_after)
            wait_until(lambda want=want: points() == want, what=f"curve at {want}")
            t.join(120)
            assert not t.errors, t.errors
        rows = [json.loads(ln) for ln in (root / "run1" / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in rows if "loss" in r][-1]
        assert f"step 9: loss {last['loss']:.4f}" in find(By.ID, "loss-caption").text
        summary = json.loads((root / "run1" / "manifest.json").read_text())["training"]
        run1 = driver.find_element(By.CSS_SELECTOR, "button.run[data-path='run1']")
        run1.click()  # open it again: finished now, with its summary
        wait_until(lambda: find(By.ID, "summary-box").is_displayed(), what="summary shown")
        assert f"final train loss\n{round(summary['final_train_loss'], 4)}" in \
            find(By.ID, "summary").text
        shot = _keep(driver, tmp_path, "ui-runs.png")
        assert shot.stat().st_size > 10_000
        assert not find(By.ID, "reward-figure").is_displayed()  # an sft run has no reward
        # A GRPO run: its reward curve, per reward, with the eval reward.
        driver.find_element(By.CSS_SELECTOR, "button.run[data-path='grpo1']").click()
        rewards = find(By.ID, "reward-figure")
        wait_until(lambda: (rewards.get_attribute("data-points"),
                            rewards.get_attribute("data-eval-points")) == ("2", "2"),
                   what="2 steps and 2 eval rewards drawn")
        last = [json.loads(ln) for ln in (root / "grpo1" / "metrics.jsonl").read_text(
            ).splitlines() if '"reward"' in ln][-1]
        assert f"step 2: reward {last['reward']:.4f}" in find(By.ID, "reward-caption").text
        _keep(driver, tmp_path, "ui-grpo.png")
    finally:
        driver.quit()
        srv.stop()
