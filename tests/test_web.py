"""`epic web`: the page's logic (upload checks, answers side by side, overlay, costs), its lazy Gradio import and,
in a real headless Chromium, the page itself served on loopback."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from epic import web
from epic.cli import build_parser, main
from epic.data.templates import get_template
from epic.eval.show import PANEL, TITLE
from epic.web import WebDemo, _gradio
from tests.chat_helpers import save_tiny_chat

QUESTION = "What color is the shape at the center?"
ARTIFACTS = Path(__file__).parent / "artifacts"  # kept after the run (git-ignored): the browser test's screenshot
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("web")
    model, processor = save_tiny_chat(folder)
    return folder, WebDemo(model, processor, get_template("vicuna_v1"), max_new_tokens=6)


def test_uploads_are_checked_for_size_and_type(tiny):
    folder, demo = tiny
    image, status = demo.check_upload(str(folder / "scene.png"))
    assert image.size == (64, 64) and status == "scene.png: 64x64, 64 visual tokens"
    assert demo.check_upload(None) == (None, "no image yet: upload one")
    image, status = demo.check_upload(str(folder / "notes.png"))
    assert image is None and status.startswith("error: notes.png is not an image in a format Pillow can read")
    small = WebDemo(demo.model, demo.processor, demo.template, max_upload_bytes=1024)
    assert "over the upload limit of 1.0 KiB" in small.check_upload(str(folder / "scene.png"))[1]


@pytest.mark.parametrize(
    ("upload", "question", "tokens", "limit", "message"),
    [
        (None, QUESTION, 9, None, "error: no image: upload one first"),
        ("notes.png", QUESTION, 9, None, "error: notes.png is not an image"),
        ("scene.png", QUESTION, 9, 1024, "error: scene.png is 8."),
        ("scene.png", "  ", 9, None, "error: empty question"),
        ("scene.png", QUESTION, 65, None, "error: budget of 65 visual tokens is larger than the image"),
    ],
)
def test_a_bad_request_is_a_message_in_the_answer_box(tiny, upload, question, tokens, limit, message):
    folder, demo = tiny
    if limit is not None:
        demo = WebDemo(demo.model, demo.processor, demo.template, max_upload_bytes=limit)
    updates = list(demo.answer(upload and str(folder / upload), question, "dart", tokens, True))
    assert len(updates) == 1 and updates[0][0].startswith(message) and updates[0][1:] == ("", None, "")


def test_side_by_side_answers_stream_with_overlay_and_costs(tiny):
    folder, demo = tiny
    updates = list(demo.answer(str(folder / "scene.png"), QUESTION, "dart", 9.0, True))
    answer, answer_full, overlay, cost = updates[-1]
    assert answer and answer_full and len(updates) > 3  # streamed, one piece at a time
    assert any(update[0] == answer and not update[1] for update in updates)  # the budget's answer comes first
    assert overlay.size == (2 * PANEL, PANEL + TITLE)
    budget_line, full_line = cost.splitlines()
    assert budget_line.startswith("dart, 9 of 64 visual tokens kept from layer 2: [kept 9/64 visual tokens")
    assert full_line.startswith("full tokens: [kept 64/64 visual tokens")
    assert not demo.model._forward_pre_hooks  # the compression was detached after answering
    alone = list(demo.answer(str(folder / "scene.png"), QUESTION, "fastv", 4, False))[-1]
    assert alone[1] == "" and alone[3].startswith("fastv, 4 of 64") and len(alone[3].splitlines()) == 1


def test_missing_gradio_is_named_with_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(SystemExit, match=re.escape("pip install 'epic-mllm[web]'")):
        _gradio()


def test_the_page_listens_on_loopback_unless_told_otherwise():
    assert build_parser().parse_args(["web"]).host == "127.0.0.1"
    assert build_parser().parse_args(["web", "--host", "0.0.0.0"]).host == "0.0.0.0"
    assert not build_parser().parse_args(["web"]).allow_remote


class FakeApp:
    """Stands in for the Gradio page: records how it would be launched."""

    def __init__(self) -> None:
        self.launched: dict | None = None

    def queue(self, **kwargs):
        return self

    def launch(self, **kwargs) -> None:
        self.launched = kwargs


def test_another_address_than_loopback_needs_the_explicit_flag(tiny, monkeypatch, capsys):
    _, demo = tiny
    app = FakeApp()
    monkeypatch.setattr(web, "build_app", lambda demo: app)
    for host in ("0.0.0.0", "192.168.1.20", "::", "example.org"):
        with pytest.raises(ValueError, match=f"to listen on {re.escape(host)} .* add --allow-remote"):
            web.serve(demo, host)
        assert app.launched is None
    assert main(["web", "--host", "0.0.0.0"]) == 2  # refused before any model is loaded
    assert re.fullmatch(r"epic web: .*add --allow-remote\n", capsys.readouterr().err)
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        web.serve(demo, host)
        assert app.launched["server_name"] == host and app.launched["share"] is False
        assert app.launched["ssr_mode"] is False  # no Node front server binding where the environment says
    web.serve(demo, "0.0.0.0", allow_remote=True)
    assert app.launched["server_name"] == "0.0.0.0"


def test_a_template_the_model_cannot_use_is_one_line_before_serving(tiny, monkeypatch, capsys):
    folder, _ = tiny
    monkeypatch.setattr(web, "serve", lambda *args, **kwargs: pytest.fail("served with a bad template"))
    assert main(["web", str(folder / "model"), "--template", "nope"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("epic web: ") and "unknown template 'nope'; choose one of" in last, last


def test_every_way_to_ask_shares_one_queue_of_one(tiny):
    """A click on Ask and Enter in the question box run the same shared model: one at a time across both."""
    pytest.importorskip("gradio")
    _, demo = tiny
    app = web.build_app(demo)
    asking = [fn for fn in app.fns.values() if fn.fn is not None and fn.fn.__name__ == "answer"]
    assert len(asking) == 2
    assert len({fn.concurrency_id for fn in asking}) == 1 and {fn.concurrency_limit for fn in asking} == {1}


def test_the_budget_slider_starts_at_a_ninth_and_cannot_keep_nothing(tiny):
    pytest.importorskip("gradio")
    _, demo = tiny
    app = web.build_app(demo)
    (slider,) = [block for block in app.blocks.values() if getattr(block, "elem_id", None) == "tokens"]
    assert (slider.minimum, slider.maximum, slider.value) == (1, 64, 7)


def test_warm_up_runs_the_model_compressed_and_at_full_tokens_before_any_timed_answer(tiny, monkeypatch):
    _, demo = tiny
    asked = []
    ask = web.ChatSession.ask
    monkeypatch.setattr(
        web.ChatSession, "ask", lambda self, question: asked.append(self.settings()) or ask(self, question)
    )
    demo.warm_up()
    assert asked == ["dart, 7 of 64 visual tokens kept from layer 2", "no compression, all 64 visual tokens"]


# ---------------------------------------------------------------------------------------------- in a browser
@pytest.fixture
def chromium() -> str:
    """Chromium's path, or skip: the browser test needs Debian's chromium and Playwright's Python client."""
    if importlib.util.find_spec("gradio") is None:
        pytest.skip("Gradio is not installed (pip install 'epic-mllm[web]')")
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("Playwright is not installed (pip install 'epic-mllm[web]')")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no Chromium browser on PATH (apt-get install chromium)")
    return path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def server(tiny, tmp_path):
    """`epic web MODEL` in a subprocess on a free loopback port; its URL once it answers."""
    folder, _ = tiny
    port = _free_port()
    log_path = tmp_path / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "-m", "epic.cli", "web", str(folder / "model"), "--port", str(port)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"epic web exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                urllib.request.urlopen(f"{url}/config", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"epic web did not answer within 120 s:\n{log_path.read_text()}")
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.browser
def test_in_a_browser_upload_ask_and_read_back(chromium, server, tiny):
    from playwright.sync_api import expect, sync_playwright

    folder, _ = tiny
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "web.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(server)
            upload = page.locator("#image input[type=file]")
            upload.set_input_files(folder / "notes.png")  # a text file named like an image: a message, no traceback
            expect(page.locator("#status textarea")).to_have_value(re.compile("notes.png is not an image"))
            page.locator("#image button[aria-label=Clear]").click()
            upload.set_input_files(folder / "scene.png")
            expect(page.locator("#preview img")).to_be_visible()
            page.locator("#question textarea").fill(QUESTION)
            page.locator("#method input").click()  # pick from the open list: typed text + Enter can race the filter
            page.get_by_role("option", name="fastv", exact=True).click()
            expect(page.locator("#method input")).to_have_value("fastv")
            page.locator("#tokens input[type=number]").fill("9")
            page.locator("#tokens input[type=number]").press("Enter")
            expect(page.locator("#tokens input[type=number]")).to_have_value("9")
            page.locator("#side_by_side input").check()
            page.locator("#ask").click()
            cost = page.locator("#cost textarea")  # filled last, once both answers are in (they arrive over a queue)
            expect(cost).to_have_value(re.compile(r"full tokens: \[kept 64/64"), timeout=30_000)
            expect(cost).to_have_value(re.compile(r"^fastv, 9 of 64 visual tokens"))
            expect(page.locator("#answer textarea")).to_have_value(re.compile(r"\S"))
            expect(page.locator("#answer_full textarea")).to_have_value(re.compile(r"\S"))
            expect(page.locator("#overlay img")).to_be_visible()
            page.screenshot(path=screenshot, full_page=True)
        finally:
            browser.close()
    print(f"screenshot: {screenshot}")
