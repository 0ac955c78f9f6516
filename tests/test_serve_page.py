"""The chat page of `llm-jax serve` (llm_jax/serve/static/chat.html) in headless Chromium, against a tiny random
model: answers stream in, equal the API's greedy answer, become history for the next turn; New chat, Stop and
API errors behave. Needs Debian's chromium and chromedriver and selenium; skipped only where they are missing."""
import contextlib
import json
import shutil
import time
import urllib.request

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
try:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    pytest.skip("selenium is not installed (pip install selenium)", allow_module_level=True)
if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
    pytest.skip(f"{CHROMIUM} and {CHROMEDRIVER} are needed (apt-get install chromium chromium-driver)",
                allow_module_level=True)

from served import serving  # noqa: E402
from test_evaluate import random_export  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ANSWER_S = 60  # a generation, on a busy 2-core machine


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)


def api_answer(url: str, model: str, messages: list[dict], max_tokens: int) -> str:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=ANSWER_S) as r:
        return json.load(r)["choices"][0]["message"]["content"]


@contextlib.contextmanager
def server(export_dir, *args):
    """(base URL, model name) of `llm-jax serve` on export_dir, started with --max-batch 2 and args."""
    with serving(export_dir, "--max-batch", "2", *args) as url:
        yield url, export_dir.name  # the default name: the checkpoint directory's


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return random_export(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def browser():
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,760"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def chat(export_dir, browser):
    """(base URL, model name, the browser) for the module's open server."""
    with server(export_dir) as (url, model):
        assert get(url + "/v1/models")["data"][0]["id"] == model
        yield url, model, browser


def open_page(chat, temperature="0", max_tokens=""):
    url, model, driver = chat
    driver.get(url + "/")
    WebDriverWait(driver, 10).until(lambda d: model in d.find_element(By.ID, "model").text)
    for field, value in (("temperature", temperature), ("max-tokens", max_tokens)):
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
        assert box.get_attribute("value") == value
    return driver


def send(driver, text, enter=False):
    driver.find_element(By.ID, "prompt").send_keys(text, *([Keys.ENTER] if enter else []))
    if not enter:
        driver.find_element(By.ID, "send").click()


def wait_answered(driver, n_answers=1):
    """Waits until n assistant messages are there and none is streaming; returns their texts (textContent: the
    characters as received, which .text would reflow)."""
    WebDriverWait(driver, ANSWER_S).until(lambda d: d.execute_script(
        "return document.querySelectorAll('#messages .assistant').length >= arguments[0]"
        " && !document.querySelector('[data-streaming]')", n_answers))
    return driver.execute_script(
        "return [...document.querySelectorAll('#messages .assistant')].map(e => e.textContent)")


def test_an_answer_streams_into_the_page(chat, tmp_path):
    driver = open_page(chat, max_tokens="40")
    # Every non-empty text the answer shows while streaming, in order: one would mean it came all at once.
    driver.execute_script("""
        window.seen = [];
        new MutationObserver(() => {
          const a = document.querySelector('#messages .assistant[data-streaming="true"]');
          const text = a ? a.textContent : "";
          if (text && text !== window.seen[window.seen.length - 1]) window.seen.push(text);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    """)
    send(driver, "Hello there")
    [answer] = wait_answered(driver)
    assert answer.strip()
    seen = driver.execute_script("return window.seen")
    assert len(seen) > 1, seen
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:])) and seen[-1] == answer
    assert driver.find_element(By.CSS_SELECTOR, "#messages .user").text == "Hello there"
    assert not driver.find_elements(By.CSS_SELECTOR, "#messages .error")
    assert driver.find_element(By.ID, "send").is_enabled() and not driver.find_element(By.ID, "stop").is_enabled()
    shot = tmp_path / "chat.png"
    assert driver.save_screenshot(str(shot))
    assert shot.exists() and shot.stat().st_size > 1000


def test_the_greedy_answer_equals_the_api_s_and_becomes_history(chat):
    url, model, _ = chat
    driver = open_page(chat, max_tokens="6")  # short: two turns must fit the tiny model's 64 tokens
    send(driver, "Hello there", enter=True)  # Enter sends
    [first] = wait_answered(driver)
    assert first.strip() == api_answer(url, model, [{"role": "user", "content": "Hello there"}], 6).strip()
    send(driver, "Tell me more")
    second = wait_answered(driver, 2)[1]
    history = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "Tell me more"}]
    assert second.strip() == api_answer(url, model, history, 6).strip()

    driver.find_element(By.ID, "new-chat").click()
    assert driver.execute_script("return document.getElementById('messages').children.length") == 0
    send(driver, "Tell me more")  # a new chat sends no earlier turns
    [alone] = wait_answered(driver)
    assert alone.strip() == api_answer(url, model, [{"role": "user", "content": "Tell me more"}], 6).strip()


def test_stop_ends_the_answer_and_frees_the_slot(chat):
    url, model, _ = chat
    driver = open_page(chat, max_tokens="48")
    # Stop as soon as the first text shows, from inside the page: a round trip through WebDriver could miss a
    # whole answer of the tiny model.
    driver.execute_script("""
        new MutationObserver((_, observer) => {
          const a = document.querySelector('#messages .assistant[data-streaming="true"]');
          if (a && a.textContent) { observer.disconnect(); document.getElementById('stop').click(); }
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    """)
    send(driver, "Hi")
    WebDriverWait(driver, ANSWER_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#messages .assistant.stopped"))
    WebDriverWait(driver, 5).until(lambda d: not d.find_elements(By.CSS_SELECTOR, "[data-streaming]"))
    stopped = driver.find_element(By.CSS_SELECTOR, "#messages .assistant").get_attribute("textContent")
    whole = api_answer(url, model, [{"role": "user", "content": "Hi"}], 48)
    assert stopped and whole.startswith(stopped) and len(stopped) < len(whole)
    deadline = time.monotonic() + 10
    while get(url + "/health")["active"] != 0:
        assert time.monotonic() < deadline, "the stopped answer's slot is still busy"
        time.sleep(0.2)


def test_an_api_error_shows_in_the_conversation(chat):
    driver = open_page(chat, max_tokens="100")  # more than the 64-token context: the server answers 400
    send(driver, "Hello there")
    WebDriverWait(driver, ANSWER_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#messages .error"))
    assert "maximum context length" in driver.find_element(By.CSS_SELECTOR, "#messages .error").text
    assert not driver.find_elements(By.CSS_SELECTOR, "#messages .assistant")
    assert driver.find_element(By.ID, "send").is_enabled()


def test_the_api_key_is_asked_for_sent_and_remembered(export_dir, browser):
    with server(export_dir, "--api-key", "sesame") as (url, model):
        driver = browser
        driver.get(url + "/")
        WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#messages .error"))
        assert "No API key provided" in driver.find_element(By.CSS_SELECTOR, "#messages .error").text
        driver.find_element(By.ID, "api-key").send_keys("sesame", Keys.TAB)  # change: lists the models again
        WebDriverWait(driver, 10).until(lambda d: model in d.find_element(By.ID, "model").text)
        driver.get(url + "/")  # remembered
        WebDriverWait(driver, 10).until(lambda d: model in d.find_element(By.ID, "model").text)
        assert driver.find_element(By.ID, "api-key").get_attribute("value") == "sesame"
        assert not driver.find_elements(By.CSS_SELECTOR, "#messages .error")
        driver.find_element(By.ID, "max-tokens").send_keys("4")
        send(driver, "Hello there")
        [answer] = wait_answered(driver)
        assert answer.strip() and not driver.find_elements(By.CSS_SELECTOR, "#messages .error")
