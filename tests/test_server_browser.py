"""The chat page at `/`, driven by headless Debian chromium through selenium.

Needs `chromium` and `chromium-driver` (Debian packages); without them the test is skipped with
the reason shown in pytest's summary (-ra). The screenshot is written to pytest's tmp dir and,
when GGSTEER_ARTIFACTS is set, into that directory too.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from support.server import expected_text, fresh_server, transcript, write_vectors

from ggsteer.serve import ServerConfig

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
TRANSCRIPT_STOPS = ["\nUser:", "\n\n\n"]
MAX_TOKENS = 12

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium and chromedriver not found: apt-get install -y chromium chromium-driver",
)


@pytest.fixture(scope="module")
def page_server(tmp_path_factory, tiny_model_path):
    directory = tmp_path_factory.mktemp("page_vectors")
    vectors = write_vectors(directory)
    with fresh_server(tiny_model_path, directory, ServerConfig(max_batch=4)) as (url, _):
        yield url, vectors


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1200,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def save_screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    artifacts = os.environ.get("GGSTEER_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(artifacts) / name)
    return path


def set_field(driver, element_id: str, value: str) -> None:
    field = driver.find_element("id", element_id)
    field.clear()
    field.send_keys(value)


def send_and_wait(driver, text: str, n_replies: int) -> str:
    """Type a message, press Enter, wait for the n-th finished reply; returns its exact text."""
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element("id", "message").send_keys(text, Keys.ENTER)
    done = ".message.assistant[data-done='true']"
    WebDriverWait(driver, 60).until(lambda d: len(d.find_elements("css selector", done)) >= n_replies)
    reply = driver.find_elements("css selector", done)[n_replies - 1]
    assert "error" not in reply.get_attribute("class"), reply.text
    return reply.find_element("css selector", ".text").get_attribute("textContent")


def test_page_steers_from_the_next_message(page_server, reference, browser, tmp_path):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, vectors = page_server
    browser.get(url + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_elements("id", "strength-happy"))
    assert {e.get_attribute("data-vector") for e in browser.find_elements("css selector", "#sliders input")} == {
        "happy", "honest", "plain"}
    set_field(browser, "temperature", "0")
    set_field(browser, "max-tokens", str(MAX_TOKENS))

    # move the happy slider ten steps of 0.05 to the right: +0.50
    slider = browser.find_element("id", "strength-happy")
    slider.click()  # the click lands mid-track (0); the arrows then move it from there
    for _ in range(10):
        slider.send_keys(Keys.ARROW_RIGHT)
    assert float(slider.get_attribute("value")) == pytest.approx(0.5)

    first = send_and_wait(browser, "hello there", 1)
    steered = expected_text(reference, vectors, transcript("hello there"), {"happy": 0.5},
                            stop=TRANSCRIPT_STOPS).lstrip()
    unsteered = expected_text(reference, vectors, transcript("hello there"), stop=TRANSCRIPT_STOPS).lstrip()
    assert steered != unsteered
    assert first == steered
    note = browser.find_elements("css selector", ".message.assistant .steering")[0].text
    assert note == "steering: happy +0.50"
    save_screenshot(browser, tmp_path, "chat-page-steered.png")

    # steering off again: the next reply continues the conversation unsteered
    browser.find_element("id", "reset-steering").click()
    second = send_and_wait(browser, "again", 2)
    history = transcript("hello there")[: -len("\nAssistant:")] + f"\nAssistant: {first}\nUser: again\nAssistant:"
    assert second == expected_text(reference, vectors, history, stop=TRANSCRIPT_STOPS).lstrip()
    save_screenshot(browser, tmp_path, "chat-page-two-turns.png")


def test_page_makes_its_sliders_the_server_default(page_server, reference, browser, tmp_path):
    import httpx
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, vectors = page_server
    browser.get(url + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_elements("id", "strength-honest"))
    set_field(browser, "temperature", "0")
    set_field(browser, "max-tokens", str(MAX_TOKENS))
    slider = browser.find_element("id", "strength-honest")
    slider.click()
    for _ in range(14):
        slider.send_keys(Keys.ARROW_LEFT)  # -0.70
    next_line = browser.find_element("id", "next-steering")
    assert next_line.text == "next message: honest -0.70 (this page only)"
    assert httpx.get(url + "/v1/steering").json()["steering"] == {}  # the switch is off: nothing sent

    browser.find_element("id", "make-default").click()
    WebDriverWait(browser, 30).until(
        lambda d: httpx.get(url + "/v1/steering").json()["steering"] == {"honest": -0.7})  # noqa: ARG005 - WebDriverWait's callback
    assert next_line.text == "next message: honest -0.70 (default for every client)"
    # any client without a steering field now gets the page's steering
    plain = httpx.post(url + "/v1/completions", json={"prompt": "the cat", "temperature": 0, "max_tokens": MAX_TOKENS},
                       timeout=60).json()["choices"][0]["text"]
    assert plain == expected_text(reference, vectors, "the cat", {"honest": -0.7}) != expected_text(
        reference, vectors, "the cat")
    reply = send_and_wait(browser, "hi", 1)
    assert reply == expected_text(reference, vectors, transcript("hi"), {"honest": -0.7},
                                  stop=TRANSCRIPT_STOPS).lstrip()
    save_screenshot(browser, tmp_path, "chat-page-default.png")

    # a reload shows the server's default on the sliders, switch on
    browser.get(url + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element("id", "make-default").is_selected())
    assert float(browser.find_element("id", "strength-honest").get_attribute("value")) == pytest.approx(-0.7)
    browser.find_element("id", "make-default").click()  # off: the default is cleared
    WebDriverWait(browser, 30).until(
        lambda d: httpx.get(url + "/v1/steering").json()["steering"] == {})  # noqa: ARG005 - WebDriverWait's callback


def wait_for_sliders(driver, url: str, name: str = "honest"):
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/")
    WebDriverWait(driver, 30).until(lambda d: d.find_elements("id", f"strength-{name}"))


def server_default(url: str, headers=None) -> dict:
    import httpx

    return httpx.get(url + "/v1/steering", headers=headers, timeout=10).json()["steering"]


def test_page_shows_and_keeps_a_default_it_cannot_edit(page_server, browser, tmp_path):
    import httpx
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = page_server
    kept = {"happy": {"op": "ablate"}, "honest": {"strength": 0.4, "layers": [2]}}
    assert httpx.post(url + "/v1/steering", json={"steering": kept}, timeout=10).status_code == 200
    try:
        wait_for_sliders(browser, url)
        locked_line = browser.find_element("id", "locked-default")
        WebDriverWait(browser, 30).until(lambda d: locked_line.text)  # noqa: ARG005 - WebDriverWait's callback
        assert locked_line.text == ("kept in the server default (not editable here): happy ablate; "
                                    "honest add, strength 0.4, layers 2")
        for name in ("happy", "honest"):
            assert not browser.find_element("id", f"strength-{name}").is_enabled()
        note = browser.find_element("css selector", ".slider.locked .locked-note").text
        assert note.startswith("server default: ablate")
        assert not browser.find_element("id", "make-default").is_selected()  # nothing the sliders hold is default

        # the switch on, then a slider moved: the page's own steering joins the default, the rest stays
        browser.find_element("id", "make-default").click()
        slider = browser.find_element("id", "strength-plain")
        slider.click()
        for _ in range(6):
            slider.send_keys(Keys.ARROW_RIGHT)  # +0.30
        browser.find_element("id", "message").click()  # leaves the slider: its change event pushes
        WebDriverWait(browser, 30).until(lambda d: server_default(url).get("plain") == 0.3)  # noqa: ARG005 - WebDriverWait's callback
        assert server_default(url) == {**kept, "plain": 0.3}
        assert browser.find_element("id", "next-steering").text == (
            "next message: happy ablate; honest add, strength 0.4, layers 2; plain +0.30 (default for every client)")
        save_screenshot(browser, tmp_path, "chat-page-locked-default.png")

        # "All to 0" and the switch off take the sliders out, never the entries the page cannot show
        browser.find_element("id", "reset-steering").click()
        WebDriverWait(browser, 30).until(lambda d: server_default(url) == kept)  # noqa: ARG005 - WebDriverWait's callback
        browser.find_element("id", "make-default").click()
        time.sleep(0.5)
        assert server_default(url) == kept
    finally:
        httpx.delete(url + "/v1/steering", timeout=10)


def test_page_with_an_api_key_reads_the_default_once_the_key_is_given(tiny_model_path, tmp_path, browser):
    import httpx
    from selenium.webdriver.support.ui import WebDriverWait

    directory = tmp_path / "keyed_vectors"
    write_vectors(directory)
    key = {"Authorization": "Bearer page-key"}
    with fresh_server(tiny_model_path, directory, ServerConfig(max_batch=2, api_key="page-key")) as (url, _):
        assert httpx.post(url + "/v1/steering", json={"steering": {"honest": -0.3}}, headers=key,
                          timeout=10).status_code == 200
        browser.get(url + "/")
        WebDriverWait(browser, 30).until(lambda d: "could not list vectors" in d.find_element("id", "sliders").text)
        set_field(browser, "api-key", "page-key")
        browser.find_element("id", "reload-vectors").click()
        WebDriverWait(browser, 30).until(lambda d: d.find_element("id", "make-default").is_selected())
        assert float(browser.find_element("id", "strength-honest").get_attribute("value")) == pytest.approx(-0.3)
        assert (browser.find_element("id", "next-steering").text
                == "next message: honest -0.30 (default for every client)")
        assert server_default(url, key) == {"honest": -0.3}
