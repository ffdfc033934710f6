"""The two real browsers the console is tested in, and the page helpers its browser test uses on both.

Chromium: Debian's chromium and chromium-driver through Selenium. Firefox: Debian's firefox-esr
through Mozilla's marionette-driver, which speaks Firefox's own Marionette protocol, because
geckodriver is not packaged by Debian and fetching it is a download this machine and CI cannot make.
`Firefox` offers the few Selenium WebDriver calls the test makes, so one test body drives either.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from tests.support.procs import free_port, wait_until

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FIREFOX = "/usr/bin/firefox-esr"
CSS, ID = "css selector", "id"  # the same strings as Selenium's By.CSS_SELECTOR and By.ID; Marionette takes them too


def have_chromium() -> bool:
    return os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)


def have_firefox() -> bool:
    if not os.path.exists(FIREFOX):
        return False
    try:
        import marionette_driver  # noqa: F401
    except ImportError:
        return False
    return True


def _stale_errors() -> tuple[type[Exception], ...]:
    """A live update re-rendered the element just now: the same thing in either driver."""
    errors: list[type[Exception]] = []
    try:
        from selenium.common.exceptions import StaleElementReferenceException
        errors.append(StaleElementReferenceException)
    except ImportError:
        pass
    try:
        from marionette_driver.errors import StaleElementException
        errors.append(StaleElementException)
    except ImportError:
        pass
    return tuple(errors)


STALE = _stale_errors()


def chromium():
    """Headless Debian chromium through Selenium, in a throw-away profile that `quit` removes."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="console-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    quit_driver = driver.quit

    def quit() -> None:
        quit_driver()
        shutil.rmtree(profile, ignore_errors=True)
    driver.quit = quit
    return driver


class Firefox:
    """Headless Debian firefox-esr over Marionette, with the WebDriver calls the test uses."""
    MIN_WIDTH = 500  # CSS pixels

    def __init__(self, log: Path):
        from marionette_driver.marionette import Marionette
        # Scripts run in the page's own scope (sandbox=None), as WebDriver's do: the test reads and
        # sets the page's globals (window.renderMarkdown, window.confirm).
        self._m = Marionette(host="127.0.0.1", port=free_port(), bin=FIREFOX, headless=True, gecko_log=str(log),
                             startup_timeout=120)
        self._m.start_session()
        self._width = self._m.window_rect["width"]

    def get(self, url: str) -> None:
        self._m.navigate(url)

    def find_element(self, by: str, value: str):
        return self._m.find_element(by, value)

    def find_elements(self, by: str, value: str):
        return self._m.find_elements(by, value)

    def execute_script(self, script: str, *args):
        return self._m.execute_script(script, script_args=args, sandbox=None)

    def execute_async_script(self, script: str, *args):
        return self._m.execute_async_script(script, script_args=args, sandbox=None)

    def set_window_size(self, width: int, height: int) -> None:
        """Firefox keeps a window at least MIN_WIDTH wide, headless too: for a narrower one (a phone)
        the page is zoomed in instead, so that it lays out in `width` CSS pixels as it would there."""
        self._m.set_window_rect(width=max(width, self.MIN_WIDTH), height=height)
        with self._m.using_context("chrome"):
            self._m.execute_script("ZoomManager.setZoomForBrowser(gBrowser.selectedBrowser, arguments[0])",
                                   script_args=(max(self.MIN_WIDTH / width, 1.0),))
        self._width = width

    def get_window_size(self) -> dict:
        return {"width": self._width, "height": self._m.window_rect["height"]}

    def save_screenshot(self, path: str) -> None:
        Path(path).write_bytes(self._m.screenshot(format="binary", full=True))

    def quit(self) -> None:
        try:
            self._m.delete_session()
        finally:
            self._m.cleanup()


# --- page helpers, for either browser ----------------------------------------------------------------

def text(driver, css: str) -> str:
    """The element's text now; a live update that re-rendered it meanwhile means: look it up again."""
    for _ in range(20):
        try:
            found = driver.find_elements(CSS, css)
            return found[0].text if found else ""
        except STALE:
            continue
    return ""


def click(driver, css: str) -> None:
    def attempt():
        try:
            driver.find_element(CSS, css).click()
            return True
        except STALE:
            return False
    wait_until(attempt, timeout=10, what=f"clicking {css}")


def wait_text(driver, css: str, needle: str, timeout: float = 30) -> str:
    return wait_until(lambda: needle in text(driver, css) and text(driver, css), timeout=timeout, interval=0.1,
                      what=f"{needle!r} in {css} (now {text(driver, css)!r})")


def tab(driver, name: str) -> None:
    driver.find_element(ID, f"tab-{name}").click()


def shot(driver, artifacts: Path, name: str, full: bool = True) -> Path:
    path = artifacts / f"{name}.png"
    driver.execute_script("window.scrollTo(0, 0)")
    if full:  # the whole page, not just the window
        height = driver.execute_script("return document.documentElement.scrollHeight")
        width = driver.get_window_size()["width"]
        driver.set_window_size(width, max(height + 120, 600))
    driver.save_screenshot(str(path))
    return path


def fill(driver, element_id: str, value: str) -> None:
    box = driver.find_element(ID, element_id)
    box.clear()
    box.send_keys(value)


def node_rows(driver) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#nodes tbody tr[data-node]')].map(r => r.dataset.node)")
