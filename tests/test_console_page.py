"""The investigator console: the files the ingress serves (``asset``), and the page itself driven
in headless Chromium against the real app on the local stack with the tiny VLM - sign in, start
a session, search from a camera's crop, confirm, reject, ask why, search from an upload - with
no request leaving 127.0.0.1. Screenshots of each step land in ``test-artifacts/console/``."""

from __future__ import annotations

import base64
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import pytest

from services.retrieval.console import CONTENT_TYPES, STATIC_DIR, asset

from .conftest import deploy_site, namespace

START = 1_795_737_600.0  # the synthetic site's clock
PORT = 8013  # away from a developer's app (8000) and test_serve's (8011)
API_KEY = "console-test-key"  # serve.api_key: a key with every role
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "console"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
BROWSER_ARGS = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1366,768", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-default-apps",
                "--disable-extensions")


# -- the static files -----------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "content_type"), [
    ("", "text/html; charset=utf-8"),
    ("index.html", "text/html; charset=utf-8"),
    ("app.js", "text/javascript; charset=utf-8"),
    ("app.css", "text/css; charset=utf-8"),
])
def test_asset_serves_the_page_files(name, content_type) -> None:
    data, served_as = asset(name)
    assert served_as == content_type
    assert data == (STATIC_DIR / (name or "index.html")).read_bytes()


@pytest.mark.parametrize("name", [
    "../__init__.py", "..", ".", "static/app.js", "/etc/passwd", "..%2f__init__.py",
    "app.js/", "a\\app.js", ".hidden.css", "app.js\x00.css", "missing.js", "__init__.py",
    "index.HTML", "app",
])
def test_asset_refuses_anything_else(name) -> None:
    with pytest.raises(KeyError):
        asset(name)


def test_the_index_page_may_fetch_crops_from_the_object_store_only() -> None:
    """Crop images are a redirect to the object store: the page's own CSP names its origin
    (and nothing a misconfigured endpoint could smuggle in)."""
    plain = asset("index.html")[0]
    page = asset("index.html", "http://127.0.0.1:9000")[0]
    assert b"connect-src 'self' http://127.0.0.1:9000;" in page and page != plain
    assert asset("index.html", "http://x; script-src *")[0] == plain
    assert asset("app.js", "http://127.0.0.1:9000")[0] == asset("app.js")[0]


def test_every_static_file_is_servable_and_ships_with_the_package() -> None:
    names = sorted(p.name for p in STATIC_DIR.iterdir())
    assert {"index.html", "app.js", "app.css"} <= set(names)
    for name in names:
        assert asset(name)[1] == CONTENT_TYPES[Path(name).suffix]
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"services.retrieval.console" = ["static/*"]' in pyproject


def test_the_page_is_self_contained_and_escapes_server_text() -> None:
    """No external URL (CDN, web font), and server text never goes through innerHTML."""
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|@import", text), path.name
    js = (STATIC_DIR / "app.js").read_text()
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(", js)
    html = (STATIC_DIR / "index.html").read_text()
    assert "Content-Security-Policy" in html and "connect-src 'self'" in html


# -- the page in a browser ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def console_site(stack_base, ray_session):
    """A small indexed site and the app deployed on it with the tiny VLM."""
    from ray import serve

    from services.ingestor.sources import synth_source

    gen = namespace(stack_base)
    settings = next(gen)
    settings.serve.max_turns = 4  # a short dialogue: the page, not the VLM, is under test
    settings.serve.rationale_tokens = 16
    _, ingested = deploy_site(settings, synth_source(5, 60, None, start_time=START),
                              port=PORT, api_key=API_KEY)
    photo = ingested[0][1].data  # an investigator's own picture: one of the crops' JPEGs
    yield settings, photo
    serve.shutdown()
    next(gen, None)  # drop the namespace's bucket


@pytest.fixture
def browser():
    """Headless Chromium (Debian's build and driver) that cannot resolve any host but
    127.0.0.1, with its console and network logs kept for the checks."""
    # part of the install (`make setup`): missing is a broken setup, not a reason to skip
    assert CHROMIUM and CHROMEDRIVER, "chromium and chromium-driver missing: run `make setup`"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with the driver's path too: Selenium Manager stays off
    for arg in (*BROWSER_ARGS, "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_window_size(1366, 768)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


class Page:
    """Small helpers over the console's ``data-testid`` hooks."""

    def __init__(self, driver) -> None:
        self.driver = driver

    def one(self, testid: str, within=None):
        from selenium.webdriver.common.by import By

        return (within or self.driver).find_element(By.CSS_SELECTOR, f'[data-testid="{testid}"]')

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def ids(self, testid: str, attr: str = "cropId") -> list[str]:
        return self.js(f"return [...document.querySelectorAll('[data-testid=\"{testid}\"]')]"
                       f".map(e => e.dataset.{attr})")

    def visible(self, testid: str) -> bool:
        return self.js(f"const e = document.querySelector('[data-testid=\"{testid}\"]');"
                       "return Boolean(e && e.offsetParent !== null);")

    def text(self, testid: str) -> str:
        return self.js(f"return document.querySelector('[data-testid=\"{testid}\"]')"
                       ".textContent.trim()")

    def turns(self) -> list[dict]:
        return self.js("return [...document.querySelectorAll('[data-testid=turn]')].map(t => "
                       "({action: t.dataset.action, text: t.textContent, crop: t.dataset.cropId,"
                       " image: t.dataset.image}))")

    def wait(self, check: Callable[[], object], what: str, timeout: float = 30):
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout, poll_frequency=0.2).until(
            lambda _: check(), message=f"waited {timeout:.0f}s for: {what}")

    def shot(self, name: str, full: bool = False) -> None:
        """The window (1366 x 768 unless resized), or with ``full`` the whole page."""
        if not full:
            self.driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))
            return
        shot = self.driver.execute_cdp_cmd("Page.captureScreenshot",
                                           {"captureBeyondViewport": True, "format": "png"})
        (ARTIFACTS / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))

    def key(self, keys: str) -> None:
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(self.driver).send_keys(keys).perform()

    def images_loaded(self, testid: str) -> bool:
        """Every crop image under the testid decoded (they are fetched with the key)."""
        return self.js(f"const imgs = [...document.querySelectorAll('[data-testid=\"{testid}\"] "
                       "img')]; return imgs.length > 0 && imgs.every(i => i.complete && "
                       "i.naturalWidth > 0 && i.src.startsWith('blob:'));")

    def no_horizontal_scroll(self) -> bool:
        return self.js("return document.documentElement.scrollWidth <= "
                       "document.documentElement.clientWidth;")


def walk(driver, base_url: str, key: str, upload: Path) -> None:
    """The investigator's path through the page, checked and photographed at each step."""
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    page = Page(driver)
    driver.get(f"{base_url}/console/")
    page.wait(lambda: page.visible("key-panel"), "the key prompt")
    assert page.js("return document.activeElement.dataset.testid") == "key-input"
    page.shot("01-key-prompt")

    # a wrong key: the API's own words come back, the prompt stays
    page.one("key-input").send_keys("not-the-key", Keys.ENTER)
    page.wait(lambda: page.visible("error"), "the 401 message")
    assert "HTTP 401" in page.text("error-text") and page.visible("key-panel")
    page.shot("02-wrong-key")
    page.one("key-input").send_keys(key, Keys.ENTER)
    page.wait(lambda: page.visible("sessions-panel"), "the session list")
    assert page.visible("whoami") and not page.visible("error")
    assert "investigator" in page.text("whoami-roles")
    assert page.js("return sessionStorage.getItem('chatreid.console.key')") == key
    assert page.js("return localStorage.length") == 0  # the key stays in this tab
    page.shot("03-sessions")

    page.one("session-title").send_keys("Console test: red top", Keys.ENTER)
    page.wait(lambda: page.visible("workspace"), "the new session")
    assert page.text("session-heading") == "Console test: red top"
    page.wait(lambda: page.js("return document.querySelector('[data-testid=camera-select]')"
                              ".options.length") > 1, "the camera list")

    # (b) a crop picked from a camera's recent crops
    Select(page.one("camera-select")).select_by_index(1)
    page.wait(lambda: page.images_loaded("crop-strip"), "the camera's crop strip")
    picked = page.ids("crop-pick")[0]
    page.one("crop-pick").click()
    page.wait(lambda: page.visible("query-image"), "the picked crop as the query")
    page.shot("04-crop-picked")
    page.js("window.__busySeen = false; new MutationObserver(() => { if (!document.querySelector("
            "'[data-testid=busy]').hidden) window.__busySeen = true; }).observe(document."
            "querySelector('[data-testid=busy]'), {attributes: true});")
    page.one("search-submit").click()
    page.wait(lambda: page.ids("result-card"), "search results", timeout=90)
    page.wait(lambda: page.images_loaded("results"), "result images")
    assert page.js("return window.__busySeen"), "no busy indicator while searching"
    results = page.ids("result-card")
    assert picked not in results and len(results) == len(set(results))
    assert page.ids("result-card", "rank") == [str(i) for i in range(1, len(results) + 1)]
    scores = page.js("return [...document.querySelectorAll('[data-testid=result-score]')]"
                     ".map(e => e.textContent)")
    assert scores[0].startswith("confidence ")  # the tiny VLM reranked the head
    search_turn = page.turns()[-1]
    assert search_turn["action"] == "search" and search_turn["image"] == picked
    assert f"{len(results)} result" in search_turn["text"]
    assert page.no_horizontal_scroll()
    page.shot("05-results")
    tab_through(page)

    # confirm the first with the keyboard: it moves to the timeline and its camera's group
    first = results[0]
    page.js("document.querySelector('[data-testid=result-card]').focus()")
    page.key("c")
    page.wait(lambda: first in page.ids("timeline-item"), "the sighting on the timeline")
    assert first not in page.ids("result-card")
    camera = page.js("return document.querySelector('[data-testid=timeline-item]')"
                     ".dataset.camera")
    assert page.ids("camera-group", "camera") == [camera]
    assert page.ids("camera-sighting") == [first]
    page.wait(lambda: page.images_loaded("timeline") and page.images_loaded("by-camera"),
              "the sighting's images")
    assert page.turns()[-1]["action"] == "confirm" and page.turns()[-1]["crop"] == first
    # the keyboard stays on the grid: the card that took the confirmed one's place
    assert page.js("return document.activeElement.dataset.testid") == "result-card"
    page.shot("06-confirmed")
    page.js("document.querySelector('[data-testid=timeline]').scrollIntoView()")
    page.shot("06b-timeline-and-cameras")

    # reject the next with its button: it disappears for good
    second = page.ids("result-card")[0]
    page.one("reject", page.one("result-card")).click()
    page.wait(lambda: second not in page.ids("result-card"), "the rejected card to go")
    assert second not in page.ids("timeline-item")
    assert page.turns()[-1]["action"] == "reject" and page.turns()[-1]["crop"] == second
    page.shot("07-rejected")

    # why? on the focused card (key w): the explanation, then Escape back to the card
    third = page.ids("result-card")[0]
    page.js("document.querySelector('[data-testid=result-card]').focus()")
    page.key("w")
    page.wait(lambda: page.js("return document.querySelector('[data-testid=explanation]').open"),
              "the explanation", timeout=60)
    assert page.text("explanation-crop") == third
    assert page.text("explanation-rationale") and page.text("explanation-model")
    assert page.turns()[-1]["action"] == "explain" and page.turns()[-1]["crop"] == third
    page.shot("08-why")
    page.key(Keys.ESCAPE)
    page.wait(lambda: page.js("return document.activeElement.dataset.cropId") == third,
              "focus back on the explained card")

    # (a) an uploaded image, the text box by "/", "changed clothes", Enter submits
    page.one("upload").send_keys(str(upload))
    page.wait(lambda: page.visible("query-image"), "the upload as the query")
    page.one("changed-clothes").click()
    driver.find_element("tag name", "body").click()
    page.key("/")
    assert page.js("return document.activeElement.dataset.testid") == "search-text"
    searches = sum(t["action"] == "search" for t in page.turns())
    page.key("red top\n")
    page.wait(lambda: sum(t["action"] == "search" for t in page.turns()) > searches,
              "the second search", timeout=90)
    last = page.turns()[-1]
    assert last["image"].startswith("upload:") and "an uploaded image" in last["text"]
    assert "may have changed clothes" in last["text"] and "red top" in last["text"]
    page.wait(lambda: page.images_loaded("results"), "result images")
    assert first not in page.ids("result-card") and second not in page.ids("result-card")
    page.shot("09-second-search")
    page.shot("09b-full-page", full=True)

    driver.set_window_size(800, 900)  # a narrow window: one column, nothing cut off
    assert page.no_horizontal_scroll()
    page.shot("10-narrow")
    driver.set_window_size(1366, 768)


def tab_through(page: Page) -> None:
    """Tab alone reaches every kind of control, and each shows its focus."""
    from selenium.webdriver.common.keys import Keys

    page.js("window.__trail = []; document.addEventListener('focusin', e => window.__trail.push("
            "[e.target.dataset.testid, getComputedStyle(e.target).outlineStyle]));"
            "document.querySelector('[data-testid=back-to-sessions]').focus();")
    page.key(Keys.TAB * 60)
    trail = page.js("return window.__trail")[1:]  # [0]: the scripted start, not a Tab
    wanted = {"search-text", "changed-clothes", "search-submit", "upload", "camera-select",
              "crop-pick", "result-card", "confirm", "reject", "why"}
    assert wanted <= {testid for testid, _ in trail}, trail
    assert all(outline != "none" for _, outline in trail), trail


def assert_stayed_local(driver, base_url: str, settings) -> None:
    """Every request the page made went to the app, or to the site's object store for a crop
    image the app redirected it to (a presigned URL); the page logged no errors."""
    origin, store = urlparse(base_url), urlparse(f"http://{settings.s3.endpoint}")
    hosts, crops = set(), 0
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            url = urlparse(message["params"]["request"]["url"])
            if url.scheme in ("blob", "data"):
                continue
            hosts.add((url.scheme, url.hostname, url.port))
            if (url.hostname, url.port) == (store.hostname, store.port):
                assert url.path.startswith(f"/{settings.s3.bucket}/crops/"), url
                assert "X-Amz-Signature=" in url.query, url
                crops += 1
    assert hosts == {(origin.scheme, origin.hostname, origin.port),
                     (store.scheme, store.hostname, store.port)}, hosts
    assert crops  # the images came straight from the store
    resources = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(r.startswith((base_url, f"http://{settings.s3.endpoint}/", "blob:", "data:"))
               for r in resources), resources
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"
              and "401" not in e["message"]]  # the wrong key's answer is logged by Chromium
    assert not severe, severe


@pytest.mark.stack
def test_an_investigation_in_the_browser(browser, console_site, tmp_path) -> None:
    settings, photo = console_site
    upload = tmp_path / "person.jpg"
    upload.write_bytes(photo)
    base_url = settings.serve.base_url
    walk(browser, base_url, API_KEY, upload)
    assert_stayed_local(browser, base_url, settings)
