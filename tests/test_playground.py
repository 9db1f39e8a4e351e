"""The playground page in a real headless Chromium (Debian's chromium package) against a real server."""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from conftest import endless_model
from lmforge.api import LM
from lmforge.serve.app import ServeSettings, create_app

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install chromium")
FLAGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture(scope="module")
def page_url(tiny_run):
    """A server for a 512-token untrained model with the tiny run's tokenizer whose replies never end by chance:
    long enough to watch stream."""
    lm = LM.load(tiny_run)
    model = endless_model(lm.tokenizer.vocab_size, lm.tokenizer.eot_id)
    slow = LM(model, lm.tokenizer, dataclasses.replace(lm.config, model=model.config))
    server = uvicorn.Server(
        uvicorn.Config(create_app(slow, ServeSettings()), host="127.0.0.1", port=0, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and thread.is_alive()
        time.sleep(0.01)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/"
    server.should_exit = True
    thread.join(timeout=20)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield chromium
        chromium.close()


def test_type_a_prompt_press_generate_and_watch_it_stream(browser, page_url):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(page_url)
    page.wait_for_function("() => document.getElementById('model').textContent.includes('context 512')")
    # count separate arrivals of text: a reply delivered in one piece would count once
    page.evaluate(
        "() => { window.arrivals = 0; new MutationObserver(() => window.arrivals++)"
        ".observe(document.getElementById('output'), {childList: true}); }"
    )
    page.fill("#prompt", "First Citizen:")
    page.fill("#max_tokens", "300")
    page.fill("#temperature", "1")
    page.fill("#seed", "3")
    page.click("#generate")
    page.wait_for_function("() => document.querySelectorAll('#output .tok').length > 0")
    assert page.is_disabled("#generate")  # still generating when the first tokens are on screen
    page.wait_for_function("() => document.getElementById('status').textContent.includes('finished')", timeout=60_000)
    assert page.evaluate("() => window.arrivals") >= 3
    assert page.inner_text("#output .prompt") == "First Citizen:"
    spans = page.query_selector_all("#output .tok")
    assert len(spans) > 10
    status = page.inner_text("#status")
    assert "finished: length" in status and "300 tokens" in status
    # every token is shaded by its probability, with the value on hover
    for span in spans[:20]:
        lines = span.get_attribute("title").splitlines()  # one line per token the piece of text came from
        each = [float(line.split(" p=")[1].split()[0]) for line in lines]
        assert float(span.get_attribute("data-p")) == pytest.approx(math.prod(each), rel=0.01, abs=1e-3)
        assert span.evaluate("e => getComputedStyle(e).backgroundColor") not in ("", "rgba(0, 0, 0, 0)")
    shades = {span.evaluate("e => e.style.backgroundColor") for span in spans}
    assert len(shades) > 1  # different probabilities, different shades
    span = next(s for s in spans if s.text_content().strip())
    span.hover()
    assert "p=" in span.get_attribute("title") and "(top: " in span.get_attribute("title")  # value, alternatives
    assert not errors


def test_errors_show_on_the_page(browser, page_url):
    page = browser.new_page()
    page.goto(page_url)
    page.wait_for_function("() => document.getElementById('model').textContent.includes('context')")
    page.fill("#prompt", "First")
    page.fill("#max_tokens", "5000")
    page.click("#generate")
    page.wait_for_function("() => document.getElementById('status').classList.contains('error')")
    assert "error 400" in page.inner_text("#status") and "max_tokens" in page.inner_text("#status")
    assert not page.is_disabled("#generate")


def test_token_probabilities_match_the_api(browser, page_url):
    """The shade's value is the probability the server reports: exp(logprob) of the token."""
    import httpx

    page = browser.new_page()
    page.goto(page_url)
    page.wait_for_function("() => document.getElementById('model').textContent.includes('context')")
    page.fill("#prompt", "All:")
    page.fill("#max_tokens", "8")
    page.fill("#temperature", "0")
    page.click("#generate")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('finished')")
    shown = [float(s.get_attribute("data-p")) for s in page.query_selector_all("#output .tok")]
    body = {"prompt": "All:", "max_tokens": 8, "temperature": 0, "logprobs": 1, "stream": True}
    want = []
    with httpx.stream("POST", page_url + "v1/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                if choice["text"]:  # the page shades each piece of text by the joint probability of its tokens
                    want.append(math.exp(sum(choice["logprobs"]["token_logprobs"])))
    assert shown == pytest.approx(want, abs=1e-4) and len(shown) > 2
