"""The draw-a-digit page in a real browser: headless Chromium draws digits with mouse strokes on #pad."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from conftest import REPO

SCREENSHOTS = REPO / "test-artifacts"  # what the browser tests leave for people to look at (git-ignored)
# the tests that drive the browser run in one pytest-xdist worker (test_report's group): one Chromium starts
pytestmark = pytest.mark.xdist_group("report")


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium driven by Selenium; skipped where it is not installed (a failure under CI)."""
    chromium, chromedriver = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")  # Debian's (.ci/run)
    if not (chromium.exists() and chromedriver.exists()):
        missing = f"{chromium} or {chromedriver} is missing: apt-get install chromium chromium-driver"
        pytest.fail(f"{missing} (CI is set)") if os.environ.get("CI") else pytest.skip(missing)
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    # no background traffic: this machine's closed network refuses it, many connections at a time
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1000,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(str(chromedriver)), options=options)
    SCREENSHOTS.mkdir(exist_ok=True)
    yield driver
    driver.quit()





# strokes in pad pixels (the pad is 280x280, its centre is 0,0 for Selenium's offsets)
STROKES = {
    1: [[(0, -90), (0, 90)]],
    7: [[(-60, -80), (60, -80), (-10, 90)]],
    0: [[(round(55 * math.sin(t / 16 * 2 * math.pi)), round(-85 * math.cos(t / 16 * 2 * math.pi)))
         for t in range(17)]],
    4: [[(20, -90), (-60, 30), (60, 30)], [(20, -90), (20, 90)]],
}


@pytest.fixture(scope="module")
def page(served_trained, browser):
    from selenium.webdriver.support.ui import WebDriverWait

    served, _ = served_trained
    browser.get(served.url + "/")
    WebDriverWait(browser, 60).until(lambda b: "epoch 1" in b.find_element("id", "model").text)
    return browser


def draw(browser, strokes) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    pad = browser.find_element("id", "pad")
    for stroke in strokes:
        actions = ActionChains(browser, duration=10)
        actions.move_to_element_with_offset(pad, *stroke[0]).click_and_hold()
        for (x0, y0), (x1, y1) in zip(stroke, stroke[1:], strict=False):
            for _ in range(4):  # several moves per segment, as a hand sends them
                actions.move_by_offset(round((x1 - x0) / 4), round((y1 - y0) / 4))
        actions.release().perform()


@pytest.mark.parametrize("expected", list(STROKES))
def test_drawn_digit_is_read_and_clear_resets(page, expected):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    page.find_element("id", "clear").click()
    assert page.find_element("id", "digit").text == "–"
    draw(page, STROKES[expected])
    shot = SCREENSHOTS / f"page-digit-{expected}.png"
    try:
        WebDriverWait(page, 30).until(lambda b: b.find_element("id", "digit").text == str(expected))
    except TimeoutException:
        page.save_screenshot(str(shot))
        logs = "\n".join(str(entry) for entry in page.get_log("browser"))
        raise AssertionError(f"#digit shows {page.find_element('id', 'digit').text!r}, not {expected} "
                             f"(screenshot {shot}; browser log: {logs or 'empty'})") from None
    page.save_screenshot(str(shot))  # for a person to look at
    # read in one script: an answer still in flight for the same drawing may redraw the bars meanwhile
    bars = page.execute_script("return [...document.querySelectorAll('#top3 li')].map(li => [li.textContent, "
                               "...['.track', '.fill'].map(k => li.querySelector(k).getBoundingClientRect().width)])")
    assert len(bars) == 3 and bars[0][0].startswith(str(expected)), bars
    _, track, fill = bars[0]
    assert fill > track / 2, bars  # the top digit's bar is drawn, and long
    assert page.find_element("id", "error").text == ""
    page.find_element("id", "clear").click()
    assert page.find_element("id", "digit").text == "–"


def test_uploaded_photo_is_read(page, tmp_path):
    from PIL import Image, ImageDraw
    from selenium.webdriver.support.ui import WebDriverWait

    photo = Image.new("RGB", (400, 300), (225, 220, 205))  # a 7 on greyish paper, off-centre
    ImageDraw.Draw(photo).line([(230, 60), (330, 60), (260, 250)], fill=(30, 30, 60), width=16)
    path = tmp_path / "seven.jpg"
    photo.save(path, "JPEG", quality=85)
    page.find_element("id", "clear").click()
    page.find_element("id", "upload").send_keys(str(path))
    WebDriverWait(page, 30).until(lambda b: b.find_element("id", "digit").text == "7")
    page.save_screenshot(str(SCREENSHOTS / "page-upload.png"))


@pytest.mark.parametrize("kind", ["touch", "pen"])
def test_touch_and_pen_draw_without_scrolling_the_page(page, kind):
    from selenium.webdriver.common.actions import interaction
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput
    from selenium.webdriver.support.ui import WebDriverWait

    size = page.get_window_size()
    page.set_window_size(500, 500)  # the answer wraps below the pad: the page is taller than the window
    try:
        page.find_element("id", "clear").click()
        pad = page.find_element("id", "pad")
        page.execute_script("arguments[0].scrollIntoView({block: 'center'})", pad)
        scrolled = page.execute_script("return window.scrollY")
        assert page.execute_script("return document.documentElement.scrollHeight > window.innerHeight")
        pointer = interaction.POINTER_TOUCH if kind == "touch" else interaction.POINTER_PEN
        actions = ActionBuilder(page, mouse=PointerInput(pointer, kind), duration=10)
        actions.pointer_action.move_to(pad, 0, -90).pointer_down()
        for step in range(1, 9):  # a downward stroke: the gesture that scrolls a page
            actions.pointer_action.move_to(pad, 0, -90 + step * 22)
        actions.pointer_action.pointer_up()
        actions.perform()
        WebDriverWait(page, 30).until(lambda b: b.find_element("id", "digit").text == "1")
        assert page.execute_script("return window.scrollY") == scrolled
        page.save_screenshot(str(SCREENSHOTS / f"page-{kind}.png"))
    finally:
        page.set_window_size(size["width"], size["height"])
