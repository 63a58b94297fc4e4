"""The web page as a studio, in a real headless Chromium (Selenium) against the real server on
loopback: each defect of issue #33 reproduced and checked fixed (prompt templates, Stop and
Clear, chat line breaks, status messages, limits and validation, lists that refresh, no silent
replace, run states, phone layout, rendered cards, honest numbers, favicon, dark mode)."""

from __future__ import annotations

import json
import urllib.request

import yaml
from conftest import qa_csv, recipe, trained_adapter
from live_server import block, wait_until
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select
from test_ui import Running, _browser, _keep, _train_in_thread, http

from adapters import train
from adapters.config import DataConfig, ModelConfig
from adapters.eval import evaluate, write_results
from adapters.model import load_base
from adapters.serving.protocol import Limits
from adapters.serving.registry import Registry
from adapters.serving.server import create_app
from adapters.serving.studio import UPLOADS

TEMPLATE = "Q: {prompt}\nA:"
RECIPE = "smollm2-pydoc-qa.yaml"  # in recipes/: its prompt template and settings


def _api(srv, path: str, body: dict) -> dict:
    code, _, text = http(srv.url + path, None, body)
    assert code == 200, text
    return json.loads(text)


def _delete(url: str) -> None:
    req = urllib.request.Request(url, method="DELETE")
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200


def _columns(driver, n: int) -> dict:
    """model -> column element, once `n` columns have ended (done, stopped or error)."""
    cols = wait_until(lambda: len(driver.find_elements(
        By.CSS_SELECTOR, ".answer[aria-busy='false']")) == n and driver.find_elements(
        By.CSS_SELECTOR, ".answer"), what=f"{n} answers ended")
    return {c.get_attribute("data-model"): c for c in cols}


def _send(driver, text: str) -> None:
    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(text)
    box.send_keys(Keys.CONTROL, Keys.ENTER)


def _pick(driver, *models: str) -> None:
    for box in driver.find_elements(By.CSS_SELECTOR, "#model-list input"):
        if box.is_selected() != (box.get_attribute("value") in models):
            box.click()


def _setup(tiny_gpt2, tmp_path):
    root = tmp_path / "root"
    trained_adapter(tiny_gpt2, root / "a1", seed=1)
    cfg = recipe(tiny_gpt2, tmp_path / "data", "train.steps=2", "train.eval_every=1",
                 "data.eval_fraction=0.25", f"data.prompt_template={json.dumps(TEMPLATE)}",
                 f"output.dir={root / 'qa'}")
    train(cfg)
    paused = recipe(tiny_gpt2, tmp_path / "data2", "train.steps=6", "train.save_every=2",
                    f"output.dir={root / 'paused'}")
    train(paused, stop_after=2)
    rows = evaluate(str(tiny_gpt2), {"a1": root / "a1"},
                    {"qa": DataConfig(train=str(tmp_path / "data" / "qa.csv"), max_seq_len=64)},
                    dtype="fp32", max_rows=8, generate=2, max_new_tokens=4)
    write_results(rows, root / "evals")
    model, tok = load_base(ModelConfig(name=str(tiny_gpt2), dtype="fp32"))
    reg = Registry(model, tok)
    reg.load("a1", root / "a1")
    reg.load("qa", root / "qa")
    srv = Running(create_app(reg, adapter_root=root,
                             limits=Limits(max_new_tokens=40, context=1024)))
    return root, reg, srv, paused


def test_the_studio_page(tiny_gpt2, tmp_path):
    driver = _browser()
    root, reg, srv, paused = _setup(tiny_gpt2, tmp_path)
    engine = srv.server.config.app.state.engine
    find = driver.find_element
    try:
        driver.set_window_size(1280, 900)
        driver.execute_cdp_cmd("Browser.grantPermissions", {  # for the Copy buttons
            "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
        driver.get(srv.url + "/")
        wait_until(lambda: driver.execute_script("return document.body.dataset.ready"),
                   what="page ready")
        # favicon served (no 404 on every load); limits from the server
        code, headers, _ = http(srv.url + "/favicon.ico")
        assert code == 200 and headers["Content-Type"].startswith("image/svg+xml")
        assert find(By.ID, "max-tokens").get_attribute("max") == "40"
        assert find(By.ID, "max-tokens").get_attribute("title").startswith(
            "this server allows 1 to 40; prompt + answer at most ")  # the model's context
        find(By.ID, "max-tokens").clear()
        find(By.ID, "max-tokens").send_keys("12")

        # 1. prompt mode sends each adapter its own template, and shows the text sent
        _pick(driver, "qa", "a1")
        _send(driver, "What is 3 plus 3?")
        cols = _columns(driver, 2)
        sent = cols["qa"].find_element(By.CSS_SELECTOR, "details.sent")
        sent.find_element(By.TAG_NAME, "summary").click()
        assert sent.find_element(By.TAG_NAME, "pre").text == "Q: What is 3 plus 3?\nA:"
        assert not cols["a1"].find_elements(By.CSS_SELECTOR, "details.sent")  # no template
        for name, prompt in (("qa", "Q: What is 3 plus 3?\nA:"), ("a1", "What is 3 plus 3?")):
            want = _api(srv, "/v1/completions", {"model": name, "prompt": prompt,
                                                 "max_tokens": 12, "temperature": 0})
            assert cols[name].find_element(By.CSS_SELECTOR, ".text").text == \
                want["choices"][0]["text"].strip(), name
            # numbers on each answer: time to first token, tokens/s, the server's counts
            nums = cols[name].find_element(By.CSS_SELECTOR, ".numbers").text
            assert "first token" in nums and (
                f"{want['usage']['prompt_tokens']} prompt + "
                f"{want['usage']['completion_tokens']} answer tokens") in nums, nums
            assert cols[name].find_element(By.CSS_SELECTOR, ".finish").text.startswith(
                "finished: ")
        # the answers were scrolled into view at 1280 px
        top = driver.execute_script(
            "return document.getElementById('answers-title').getBoundingClientRect().top")
        assert 0 <= top < driver.execute_script("return window.innerHeight")
        copy = cols["qa"].find_element(By.CSS_SELECTOR,
                                       "button[aria-label='Copy the answer of qa']")
        copy.click()
        wait_until(lambda: copy.text == "Copied", what="answer copied")
        assert driver.execute_async_script(
            "navigator.clipboard.readText().then(arguments[0])") == \
            cols["qa"].find_element(By.CSS_SELECTOR, ".text").text
        find(By.ID, "use-template").click()  # off: the raw text, as typed
        _send(driver, "What is 3 plus 3?")
        assert not _columns(driver, 2)["qa"].find_elements(By.CSS_SELECTOR, "details.sent")
        _keep(driver, tmp_path, "studio-1280.png")

        # 3. Stop: a queued answer stopped from the page leaves the server's queue
        started, release = block(engine)
        assert started.wait(60)
        _pick(driver, "qa")
        _send(driver, "Stop me")
        wait_until(lambda: engine.waiting() == 1, what="the request queued")
        find(By.CSS_SELECTOR, ".answer[data-model='qa'] button.stop").click()
        col = _columns(driver, 1)["qa"]
        assert col.find_element(By.CSS_SELECTOR, ".finish").text == "stopped"
        assert find(By.ID, "send").is_enabled()
        release.set()
        wait_until(lambda: engine.waiting() == 0 and not engine.running(),
                   what="the stopped request gone from the server")
        assert find(By.ID, "answers-status").text == "Stopped."
        started, release = block(engine)  # Stop all: both columns, both requests gone
        assert started.wait(60)
        _pick(driver, "qa", "a1")
        _send(driver, "Stop us")
        wait_until(lambda: engine.waiting() == 2, what="both queued")
        find(By.ID, "stop-all").click()
        assert {c.find_element(By.CSS_SELECTOR, ".finish").text
                for c in _columns(driver, 2).values()} == {"stopped"}
        release.set()
        wait_until(lambda: engine.waiting() == 0 and not engine.running(), what="queue empty")
        _pick(driver, "qa")

        # 2. Clear while streaming stops it, and the cleared chat does not come back
        find(By.ID, "mode-chat").click()
        find(By.ID, "system").send_keys("Answer briefly.")
        started, release = block(engine)
        assert started.wait(60)
        _send(driver, "first question")
        wait_until(lambda: engine.waiting() == 1, what="queued")
        find(By.ID, "clear").click()
        assert find(By.ID, "send").is_enabled() and not find(By.ID, "answers").text
        release.set()
        wait_until(lambda: engine.waiting() == 0 and not engine.running(), what="queue empty")
        # 3 (defect). earlier turns keep their line breaks; the system prompt is sent
        box = find(By.ID, "prompt")
        box.clear()
        box.send_keys("line one", Keys.SHIFT, Keys.ENTER, Keys.NULL, "line two")
        box.send_keys(Keys.CONTROL, Keys.ENTER)
        first = _columns(driver, 1)["qa"].find_element(By.CSS_SELECTOR, ".text").text
        want = _api(srv, "/v1/chat/completions", {"model": "qa", "max_tokens": 12,
                                                  "temperature": 0, "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "line one\nline two"}]})
        assert first == want["choices"][0]["message"]["content"].strip()
        _send(driver, "and again")
        turns = [t.text for t in _columns(driver, 1)["qa"].find_elements(
            By.CSS_SELECTOR, ".turn")]
        assert turns[0] == "You: line one\nline two"  # not "first question": it was cleared
        assert "first question" not in " ".join(turns)
        find(By.ID, "mode-prompt").click()

        # 4. a failed unload stays on screen; every column failing says so
        started, release = block(engine)
        assert started.wait(60)
        _pick(driver, "a1")
        _send(driver, "busy")
        wait_until(lambda: engine.waiting() == 1, what="queued")
        find(By.CSS_SELECTOR, "button[aria-label='Unload a1']").click()  # queued behind it
        release.set()  # the answer takes a1 first, then the unload finds it in use
        wait_until(lambda: "Unload failed" in find(By.ID, "status").text, what="unload refused")
        _columns(driver, 1)
        assert "in use" in find(By.ID, "status").text  # not overwritten by the answers
        assert find(By.ID, "answers-status").text == "Answers done."
        find(By.ID, "stop").send_keys("x" * 300)  # longer than the server allows
        _send(driver, "fails")
        assert _columns(driver, 1)["a1"].get_attribute("data-state") == "error"
        assert find(By.ID, "answers-status").text == "Every answer failed."
        find(By.ID, "stop").clear()

        # 5. fields bounded as the server is, with messages that say what is wanted
        seed = find(By.ID, "seed")
        seed.send_keys("1e30")
        assert not driver.execute_script("return document.getElementById('ask').checkValidity()")
        seed.clear()
        name = find(By.ID, "load-name")
        name.clear()
        name.send_keys("bad name!")
        assert "letters, digits" in name.get_attribute("validationMessage")

        # 7. Load does not silently replace a loaded adapter
        Select(find(By.ID, "load-path")).select_by_visible_text("a1")
        assert find(By.ID, "load-name").get_attribute("value") == "a1-2"  # a free name
        name.clear()
        name.send_keys("qa")
        find(By.ID, "load").click()
        assert "is loaded already" in find(By.ID, "status").text
        assert reg.folder("qa") == root / "qa"

        # 6. models and folders refresh by themselves
        _delete(srv.url + "/v1/adapters/a1")  # elsewhere: not through the page
        wait_until(lambda: not driver.find_elements(
            By.CSS_SELECTOR, "#model-list input[value='a1']"), what="a1 gone from the list")
        trained_adapter(tiny_gpt2, root / "late", seed=3)
        wait_until(lambda: "late" in driver.execute_script(  # read at once: the list renews
            "return [...document.getElementById('load-path').options].map((o) => o.text)"),
                   what="a new adapter folder offered")

        # 10. the card is formatted text: no YAML header, its figures in a table
        find(By.CSS_SELECTOR, "button[aria-label='Model card of qa']").click()
        card = find(By.ID, "card-text")
        wait_until(card.is_displayed, what="card shown")
        assert not card.text.startswith("---") and card.find_elements(By.TAG_NAME, "h3")
        assert card.find_elements(By.CSS_SELECTOR, "table th")  # its figures as a table
        find(By.ID, "card-dialog").send_keys(Keys.ESCAPE)

        # 9. phone width: no sideways scroll in either view
        driver.set_window_size(390, 844)
        width = "return document.documentElement.scrollWidth"
        assert driver.execute_script(width) <= 390
        _keep(driver, tmp_path, "studio-390-playground.png")

        # 8. runs: a stopped run says how to resume; a run's summary comes when it finishes
        find(By.ID, "tab-runs").click()
        wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, "button.run[data-path='paused']"),
                   what="paused listed").pop().click()
        state = find(By.ID, "run-state")
        wait_until(lambda: "Stopped at step 2" in state.text, what="stopped state")
        line = lambda run: find(By.CSS_SELECTOR,  # noqa: E731
                                f"button.run[data-path='{run}'] ~ .run-line").text
        assert line("paused") == "stopped at step 2, resumable"
        assert line("qa").startswith("finished, eval loss ")
        assert "adapters train paused/recipe.resolved.yaml --resume" in state.text
        assert driver.execute_script(width) <= 390
        _keep(driver, tmp_path, "studio-390-runs.png")
        driver.set_window_size(1280, 900)
        t = _train_in_thread(paused, resume="latest")
        t.join(300)
        assert not t.errors, t.errors
        wait_until(lambda: find(By.ID, "summary-box").is_displayed(), what="summary on finish")
        assert state.text == "Finished."
        latest = find(By.ID, "latest").text
        assert "tokens/s (median of last" in latest
        # eval tables say which way is better, and counts carry no percentage
        driver.find_element(By.CSS_SELECTOR, "button.run[data-path='evals']").click()
        wait_until(lambda: find(By.ID, "results-box").is_displayed(), what="eval tables")
        caps = {c.text: c.find_element(By.XPATH, "..") for c in driver.find_elements(
            By.CSS_SELECTOR, "#results-tables caption")}
        assert "loss (lower is better)" in caps and "tokens" in caps, list(caps)
        assert "%" in caps["loss (lower is better)"].text and "%" not in caps["tokens"].text
        find(By.CSS_SELECTOR, "#results-samples-box summary").click()
        assert driver.find_elements(By.CSS_SELECTOR, "#results-samples .sample")
        # the board: loss curves of two runs on one chart
        for run in ("qa", "paused"):
            find(By.CSS_SELECTOR, f"input.compare[data-path='{run}']").click()
        wait_until(lambda: find(By.ID, "compare-figure").is_displayed(), what="compare chart")
        assert find(By.ID, "compare-figure").get_attribute("data-lines") == "2"
        _keep(driver, tmp_path, "studio-1280-runs.png")

        # dark mode follows the system setting
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [
            {"name": "prefers-color-scheme", "value": "dark"}]})
        bg = driver.execute_script(
            "return getComputedStyle(document.documentElement).backgroundColor")
        assert bg == "rgb(13, 17, 23)", bg
        # no JavaScript exception all along (the refused requests above are network entries)
        logs = driver.get_log("browser")
        assert not [e for e in logs if e["source"] == "javascript"], logs
        assert not [e for e in logs if "favicon" in e["message"]], logs
    finally:
        driver.quit()
        srv.close()


def test_from_an_empty_page_to_a_trained_adapter_with_clicks_only(tiny_gpt2, tmp_path):
    """Upload a CSV, train on the served base, stop, resume, load, ask: all from the page."""
    driver = _browser()
    root = tmp_path / "root"
    root.mkdir()
    data = qa_csv(tmp_path / "qa.csv", 24)
    model, tok = load_base(ModelConfig(name=str(tiny_gpt2), dtype="fp32"))
    srv = Running(create_app(Registry(model, tok), adapter_root=root))
    find = driver.find_element
    try:
        driver.set_window_size(1280, 900)
        driver.get(srv.url + "/")
        wait_until(lambda: driver.execute_script("return document.body.dataset.ready"),
                   what="page ready")
        assert not driver.find_elements(By.CSS_SELECTOR, "#model-list button")  # no adapter
        find(By.ID, "tab-train").click()
        train_view = find(By.ID, "train")

        # a long run, stopped from the page while it trains, then resumed from its checkpoint
        find(By.ID, "train-name").send_keys("long")
        find(By.ID, "train-file").send_keys(str(data))  # the file picker
        steps = find(By.ID, "train-steps")
        steps.clear()
        steps.send_keys("400")
        find(By.ID, "train-start").click()
        wait_until(lambda: (root / "long" / "metrics.jsonl").exists()
                   and (root / "long" / "metrics.jsonl").stat().st_size, 120, what="training")
        find(By.ID, "tab-runs").click()  # the board shows it training, with its step and ETA
        board = wait_until(lambda: driver.find_elements(
            By.CSS_SELECTOR, "button.run[data-path='long'] ~ .run-line"), what="long listed")
        wait_until(lambda: "training: step " in board[0].text, what="training on the board")
        assert " of 400" in board[0].text and " left" in board[0].text
        code, _, text = http(srv.url + "/ui/api/train", None, {  # one run at a time
            "name": "second", "data": f"{UPLOADS}/qa.csv", "steps": 2})
        assert code == 409 and "'long' is training" in text
        code, _, text = http(srv.url + "/ui/api/upload?filename=..%2Fx.csv", None, {})
        assert code == 400 and "file name" in text  # uploads stay in the runs folder
        find(By.ID, "tab-train").click()
        find(By.ID, "train-stop").click()
        wait_until(lambda: train_view.get_attribute("data-state") == "stopped", 120,
                   what="stopped")
        assert "stopped (checkpoint kept)" in find(By.ID, "train-status").text
        assert list((root / "long" / "checkpoints").glob("step-*"))
        assert (root / UPLOADS / "qa.csv").read_text() == data.read_text()
        find(By.ID, "train-resume").click()
        wait_until(lambda: train_view.get_attribute("data-state") == "finished", 240,
                   what="resumed run finished")
        assert json.loads((root / "long" / "manifest.json").read_text())["training"][
            "steps"] == 400

        code, _, text = http(srv.url + "/ui/api/train", None, {
            "name": "outside", "data": "../qa.csv", "steps": 2})
        assert code == 400 and "not an uploaded file" in text
        code, _, text = http(srv.url + "/ui/api/train", None, {
            "name": "other", "data": f"{UPLOADS}/qa.csv", "base": "/etc", "steps": 2})
        assert code == 400 and "base '/etc': not one of default" in text
        assert [o.text for o in Select(find(By.ID, "train-base")).options] == [
            "this server's base (loadable here)", "default"]
        # a short one with a recipe's settings (its template, format) and the uploaded data,
        # loaded with one click, answering beside the base
        name = find(By.ID, "train-name")
        name.clear()
        name.send_keys("mine")
        Select(find(By.ID, "train-data")).select_by_visible_text(f"{UPLOADS}/qa.csv")
        Select(find(By.ID, "train-recipe")).select_by_visible_text(RECIPE)
        steps.clear()
        steps.send_keys("6")
        find(By.ID, "train-start").click()
        wait_until(lambda: train_view.get_attribute("data-state") == "training", 60,
                   what="training mine")
        wait_until(lambda: train_view.get_attribute("data-state") == "finished", 120,
                   what="mine finished")
        find(By.ID, "train-load").click()
        wait_until(lambda: find(By.ID, "play").is_displayed(), what="back in the playground")
        _pick(driver, "base", "mine")
        _send(driver, "What is 2 plus 2?")
        cols = _columns(driver, 2)
        recipe = json.loads(json.dumps(yaml.safe_load((root / "mine" / "studio-recipe.yaml")
                                                       .read_text())))
        template = recipe["data"]["prompt_template"]  # the recipe's, kept
        assert recipe["model"]["name"] == str(tiny_gpt2) and recipe["lora"]["r"] == 8
        for m, prompt in (("base", "What is 2 plus 2?"),
                          ("mine", template.replace("{prompt}", "What is 2 plus 2?"))):
            want = _api(srv, "/v1/completions", {"model": m, "prompt": prompt, "max_tokens": 64,
                                                 "temperature": 0})
            assert cols[m].find_element(By.CSS_SELECTOR, ".text").text == \
                want["choices"][0]["text"].strip(), m
        _keep(driver, tmp_path, "studio-trained.png")
    finally:
        driver.quit()
        srv.close()
