"""The upload page in headless Chromium: pick a file, submit, read the answer."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect, sync_playwright

from hm_mlflow.dataset import list_split

from support import require_chromium

pytestmark = pytest.mark.integration

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    executable = require_chromium()
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium")),
            executable_path=executable,
            args=CHROMIUM_ARGS,
            headless=True,
        )
        yield context.new_page()
        context.close()


def test_upload_a_film_and_see_the_answer(page, webapp, trained, sample_root):
    settings, _ = trained
    film = next(s for s in list_split(sample_root, "test") if s.label == 1)
    page.goto(webapp)
    expect(page.locator("#model-info")).to_contain_text(f"{settings.model_name} version 1")
    expect(page.locator("#synthetic-warning")).to_be_visible()

    page.set_input_files("#file", film.location)
    page.click("button[type=submit]")

    expect(page.locator("#label")).to_have_text(re.compile(r"^(NORMAL|PNEUMONIA)$"))
    expect(page.locator("#probability")).to_have_text(re.compile(r"^\d{1,3}\.\d%$"))
    thumbnail = page.locator("#thumbnail")
    expect(thumbnail).to_be_visible()
    assert page.evaluate("document.getElementById('thumbnail').naturalWidth") > 0
    expect(page.locator("#result")).to_contain_text("model version 1")


def test_a_wrong_file_gets_a_readable_error(page, webapp, tmp_path):
    notes = tmp_path / "notes.jpg"  # the extension lies; the bytes decide
    notes.write_text("not an x-ray")
    page.goto(webapp)
    page.set_input_files("#file", str(notes))
    page.click("button[type=submit]")
    expect(page.locator("#error")).to_contain_text("not a JPEG, PNG or DICOM")
    expect(page.locator("#result")).to_have_count(0)
