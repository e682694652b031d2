"""The web app in a real (headless) browser: type a report, click Generate, see the preview.

Needs chromium and its driver (Debian: apt-get install chromium chromium-driver);
skipped without them. With CTFLOW_SCREENSHOT=1 the screenshot is written to
docs/app.png (the README's picture), using the embedded model when it is
installed; otherwise to the test's tmp folder, with the tiny random pipeline.
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("SE_OFFLINE", "true")  # selenium never downloads drivers

import json  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)),
        reason=f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)",
    ),
]
pytest.importorskip("gradio", reason="the web app needs the 'app' extra: pip install -e '.[app]'")
pytest.importorskip("selenium", reason="the browser test needs selenium (the 'app' extra)")

REPORT = (
    "Findings: Heart size is enlarged. Left-sided pleural effusion is present. "
    "A 14 mm nodule is seen in the upper lobe of the right lung.\n"
    "Impressions: Cardiomegaly. Left pleural effusion. Right upper lobe nodule."
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--window-size=1400,1250",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # to list every request
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def requested_urls(driver) -> set[str]:
    urls = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.add(message["params"]["request"]["url"])
    return urls


def set_field(driver, css: str, value: str) -> None:
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element("css selector", css)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(value)
    field.send_keys(Keys.TAB)


def test_browser_generates_and_shows_preview(tmp_path):
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from ctflow.app import LAUNCH_OPTIONS, build_app
    from ctflow.pipeline import DEFAULT_MODEL, CTFlowPipeline

    screenshot_for_readme = os.environ.get("CTFLOW_SCREENSHOT") == "1"
    if screenshot_for_readme and (DEFAULT_MODEL / "model_index.json").is_file():
        pipe, slices, steps = CTFlowPipeline.from_pretrained(None), "", "20"  # the model decides the length
        timeout = 500
    else:
        from tests.tiny_pipeline import tiny_pipeline

        pipe, slices, steps = tiny_pipeline(), "12", "3"
        timeout = 120
    shot = ROOT / "docs" / "app.png" if screenshot_for_readme else tmp_path / "app.png"

    demo = build_app(pipe, out_dir=tmp_path / "out")
    demo.launch(
        server_name="127.0.0.1",
        server_port=free_port(),
        prevent_thread_lock=True,
        quiet=True,
        **LAUNCH_OPTIONS,
    )
    driver = chromium()
    try:
        driver.get(demo.local_url)
        wait = WebDriverWait(driver, timeout)
        report = wait.until(ec.element_to_be_clickable(("css selector", "#ctflow-report textarea")))
        report.clear()
        report.send_keys(REPORT)
        # the seed box holds a seed drawn for this page (an empty box showed and sent 0: seed 0 for all)
        assert wait.until(
            lambda d: d.find_element("css selector", "#ctflow-seed input").get_attribute("value") != "0"
        )
        set_field(driver, "#ctflow-slices input", slices)
        set_field(driver, "#ctflow-steps input[type=number]", steps)
        set_field(driver, "#ctflow-seed input", "1")
        driver.find_element("css selector", "#ctflow-generate").click()

        def finished(d):
            text = d.find_element("css selector", "#ctflow-status textarea").get_attribute("value") or ""
            return text if "seed 1" in text else False

        status = wait.until(finished)
        preview = wait.until(ec.visibility_of_element_located(("css selector", "#ctflow-preview img")))
        wait.until(ec.visibility_of_element_located(("css selector", "#ctflow-axial img")))
        wait.until(
            lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", preview)
        )
        assert preview.is_displayed()
        assert "SYNTHETIC" in status
        if not slices:
            assert "slices" in status
        else:
            assert f"{slices} slices" in status
        shot.parent.mkdir(parents=True, exist_ok=True)
        driver.execute_script("window.scrollTo(0, 0)")
        assert driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        local = demo.local_url.rstrip("/")
        urls = requested_urls(driver)
        assert any(u.startswith(local) for u in urls)
        outside = {u for u in urls if not u.startswith((local, "data:", "blob:"))}
        assert not outside, f"the page fetched from outside the app: {sorted(outside)}"
    finally:
        driver.quit()
        demo.close()
