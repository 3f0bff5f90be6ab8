"""The search page in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) driven by Selenium, against the service on a real uvicorn server.

The page is screenshotted to ``$IMTEXT_TEST_OUTPUT/search-page.png`` (default:
``artifacts/test-output/`` in the repository), where a CI run collects its outputs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from imtext.serve.gallery import read_gallery
from imtext.serve.index import IndexCache
from imtext.serve.model import ExportDirSource
from imtext.serve.service import Service
from tests.conftest import REPO
from tests.serving import running, serve_config, tiny_export

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="Chromium or chromedriver is not installed (Debian: apt-get install chromium "
        "chromium-driver; `make test` installs them where apt-get can)",
    ),
]
#: Flags of a browser that reaches nothing but the server under test.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,900",
)  # fmt: skip


def output_dir() -> Path:
    """Where this test run's outputs go: ``$IMTEXT_TEST_OUTPUT`` or artifacts/test-output/."""
    path = Path(os.environ.get("IMTEXT_TEST_OUTPUT") or REPO / "artifacts" / "test-output")
    path.mkdir(parents=True, exist_ok=True)
    return path


def chromium(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=DriverService(executable_path=CHROMEDRIVER), options=options)


def search_page(driver, url: str, caption: str, timeout: float = 30.0) -> list[str]:
    """Open the page at ``url``, type ``caption``, submit; the image names of the grid."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/")
    wait = WebDriverWait(driver, timeout)
    wait.until(ec.text_to_be_present_in_element((By.ID, "model"), "version"))
    box = driver.find_element(By.ID, "q")
    box.send_keys(caption, Keys.ENTER)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#grid .hit img")))
    wait.until(
        lambda d: all(i.get_property("complete") for i in d.find_elements(By.TAG_NAME, "img"))
    )
    return [
        cell.get_attribute("data-image")
        for cell in driver.find_elements(By.CSS_SELECTOR, "#grid .hit")
    ]


def test_typing_a_test_caption_finds_its_image(tmp_path):
    """Types a caption of the test split and finds that caption's image in the grid.

    Honest scope: the model is the stand-in ONNX pair of tests/serving.py (untrained), and the
    gallery is the test split of a 36-image rendering of the built-in dataset: 6 images, all of
    which fit in the page's 20-result grid. So this checks the page, the routes and the browser
    working together (the typed caption reaches the model, the grid shows that image with its
    score, a click shows nearest captions, the model version is on screen), not retrieval quality,
    which evaluate and export measure.
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from imtext.data.shapes import generate_shapes

    generate_shapes(tmp_path / "shapes", n_images=36, seed=5, size=32)
    dataset = json.loads((tmp_path / "shapes/dataset.json").read_text())
    image = next(entry for entry in dataset["images"] if entry["split"] == "test")
    caption = image["sentences"][0]["raw"]
    gallery = read_gallery(tmp_path / "shapes", "test")
    assert len(gallery) <= 20, "the grid must hold the whole gallery (see the docstring)"
    cfg = serve_config(poll_seconds=0.0)
    source = ExportDirSource(tiny_export(tmp_path / "export"))
    service = Service(source, gallery, cfg, IndexCache(tmp_path / "cache"))
    with running(service, cfg) as url:
        driver = chromium(tmp_path / "profile")
        try:
            grid = search_page(driver, url, caption)
            assert image["filename"] in grid
            assert sorted(grid) == sorted(gallery.names)
            model = driver.find_element(By.ID, "model").text
            assert model == f"model: export version {source.current_version()}"
            scores = driver.find_elements(By.CSS_SELECTOR, "#grid .hit .score")
            assert all(
                s.text.startswith(name + " · ") for s, name in zip(scores, grid, strict=True)
            )
            cell = driver.find_element(
                By.CSS_SELECTOR, f'#grid .hit[data-image="{image["filename"]}"]'
            )
            cell.click()
            WebDriverWait(driver, 30).until(
                ec.text_to_be_present_in_element((By.ID, "captions"), image["filename"])
            )
            assert len(driver.find_elements(By.CSS_SELECTOR, "#captions li")) == 5
            shot = output_dir() / "search-page.png"
            assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 1000
        finally:
            driver.quit()
