"""The dashboard in a real browser (headless Chromium) while the real daemon writes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import free_endpoint
from tests.test_alarm_daemon import RULE, Rig, bright_weights, rig  # noqa: F401 (fixtures)

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")


@pytest.fixture
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1400,2200"):
        opts.add_argument(a)
    opts.binary_location = str(CHROMIUM)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    yield driver
    driver.quit()


def _serve(config: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "monitor", "dashboard", "--config", str(config), "--port",
         str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health",
                                        timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"dashboard did not start: {proc.communicate()[1][-2000:]!r}")
        time.sleep(0.3)


def test_dashboard_shows_the_build_and_refreshes(rig: Callable[..., Rig],  # noqa: F811
                                                 browser: object) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # an alarm opens at layer 2; the test weights are not trusted here (a banner says so)
    r = rig(RULE.replace("trust_unadapted = true", "trust_unadapted = false"))
    for n in (1, 2, 3):
        r.write(n, (20 + 5 * n, 30, 12, 12))
    port = int(free_endpoint().rsplit(":", 1)[1])
    proc = _serve(r.config, port)
    try:
        driver = browser
        driver.get(f"http://127.0.0.1:{port}/?build=B1")  # type: ignore[attr-defined]

        def text() -> str:
            return str(driver.find_element(By.TAG_NAME, "body").text)  # type: ignore[attr-defined]

        WebDriverWait(driver, 60).until(lambda _: "Build B1" in text()
                                        and "camera image with defects" in text()
                                        and "swelling" in text())
        assert "Layer 3: ok" in text() and "B1 (3 layers)" in text()
        imgs = driver.find_elements(By.TAG_NAME, "img")  # type: ignore[attr-defined]
        assert any(int(i.get_attribute("naturalWidth") or 0) >= 96 for i in imgs)
        assert "Open alarms (1)" in text()
        # The daemon writes on: the page follows without a reload.
        r.write(4, (40, 30, 12, 12))
        WebDriverWait(driver, 60).until(lambda _: "Layer 4: ok" in text())
        # ... and so does the sidebar: it said "B1 (3 layers)" over a page of 4 layers.
        WebDriverWait(driver, 60).until(lambda _: "B1 (4 layers)" in text())
        assert "B1 (3 layers)" not in text()
        # Ack from the page: through the daemon, which publishes the transition.
        # The page redraws itself every few seconds: an element found may be gone a moment
        # later, so find and click the button again until the click lands.
        from selenium.common.exceptions import StaleElementReferenceException

        def clicker(label: str, *, enabled_only: bool = False) -> Callable[[object], bool]:
            """A wait condition that clicks the page's one button `label` (the page may redraw
            under it: then it tries again)."""
            def click(_: object) -> bool:
                try:
                    buttons = [b for b in driver.find_elements(By.TAG_NAME, "button")  # type: ignore[attr-defined]
                               if b.text.strip() == label
                               and (b.is_enabled() or not enabled_only)]
                    if len(buttons) != 1:
                        return False
                    buttons[0].click()
                    return True
                except StaleElementReferenceException:
                    return False
            return click

        WebDriverWait(driver, 30).until(clicker("Ack"))
        assert r.listener is not None
        r.listener.wait(lambda: any(a["state"] == "acknowledged" for a in r.alarms()))
        # The page says so where the alarm is listed, not only in a toast over "(open)".
        WebDriverWait(driver, 30).until(lambda _: "(acknowledged)" in text())
        assert "(open)" not in text()
        # Every plot drawn: monitor/reports/html_report.py shadowed the standard library's html in
        # the Streamlit script's folder, and each plot was a ModuleNotFoundError.
        assert "Traceback" not in text() and "NotFoundError" not in text(), text()
        # The operator's verdict from the page, beside Ack: stored and published.
        WebDriverWait(driver, 30).until(clicker("False alarm", enabled_only=True))
        r.listener.wait(lambda: any(a.get("verdict") == "false_alarm" for a in r.alarms()))
        WebDriverWait(driver, 60).until(lambda _: "verdict false_alarm" in text())
        # The weights are not adapted to this camera: the page says so.
        assert "Model not trusted on this camera" in text()
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "dashboard.png"))  # type: ignore[attr-defined]
        assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
    finally:
        proc.terminate()
        proc.wait(20)
    # The command is the server: stopping it stops serving (no Streamlit left orphaned).
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
