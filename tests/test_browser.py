"""The upload page in headless Chromium (Debian's), at a desktop and a phone size.

One film, a set with a bad file among them, drag and drop, a DICOM film, the heat map, the
model card, the page without JavaScript, and axe-core over each state: zero serious or critical
violations. Every state is saved as a screenshot under test-artifacts/screenshots/ (the README
names the folder), the figures a person would look at when a test fails.
"""

from __future__ import annotations

import base64
import csv
import io
import re
from pathlib import Path

import cv2
import httpx
import pytest
from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import expect, sync_playwright

from hm_mlflow.dataset import list_split
from hm_mlflow.monitoring.store import PredictionLog

from dicom_files import make_dicom
from support import require_chromium, run_hm_mlflow

pytestmark = pytest.mark.integration

SCREENSHOTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "screenshots"
VIEWPORTS = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}
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
LABEL = re.compile(r"^(NORMAL|PNEUMONIA)$")
PERCENT = re.compile(r"^\d{1,3}\.\d%$")


def _launch(playwright, folder: Path, javascript: bool = True):
    return playwright.chromium.launch_persistent_context(
        str(folder),
        executable_path=require_chromium(),
        args=CHROMIUM_ARGS,
        headless=True,
        java_script_enabled=javascript,
        accept_downloads=True,
    )


@pytest.fixture(scope="module")
def playwright():
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright, tmp_path_factory):
    context = _launch(playwright, tmp_path_factory.mktemp("chromium"))
    yield context
    context.close()


@pytest.fixture(params=list(VIEWPORTS))
def page(request, browser):
    """A fresh page at the desktop or the phone size; its name is `page.viewport_name`."""
    tab = browser.new_page()
    tab.set_viewport_size(VIEWPORTS[request.param])
    tab.viewport_name = request.param
    yield tab
    tab.close()


@pytest.fixture(scope="module")
def films(sample_root) -> list[Path]:
    """Two films of each class from the project's own sample set."""
    test = list_split(sample_root, "test")
    chosen = [s for s in test if s.label == 0][:2] + [s for s in test if s.label == 1][:2]
    return [Path(s.location) for s in chosen]


def shoot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}-{page.viewport_name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def no_serious_violations(page) -> None:
    """axe-core (4.x, run in the page) finds no serious or critical violation."""
    violations = Axe().run(page).response["violations"]
    serious = [
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
        for v in violations
        if v["impact"] in ("serious", "critical")
    ]
    assert not serious, serious


def fits_the_width(page) -> None:
    """Nothing runs off the right edge: the page is no wider than the viewport."""
    overflow = page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0, f"the page is {overflow} px wider than the {page.viewport_name} screen"


def wait_for_answers(page, count: int) -> None:
    expect(page.locator("#summary")).to_contain_text(f"{count} of {count} films answered")


def test_one_film_gets_an_answer_with_its_version(page, webapp, trained, films):
    settings, _ = trained
    page.goto(webapp)
    expect(page.locator("#model-info")).to_contain_text(f"{settings.model_name} version 1")
    expect(page.locator("#synthetic-warning")).to_be_visible()
    no_serious_violations(page)
    shoot(page, "01-empty")

    page.set_input_files("#file", str(films[2]))
    page.click("button[type=submit]")
    wait_for_answers(page, 1)

    row = page.locator("tr.film-row")
    expect(row.locator(".label-text")).to_have_text(LABEL)
    expect(row.locator(".probability .value")).to_have_text(PERCENT)
    expect(row.locator(".version")).to_have_text("1")
    expect(row.locator(".bar .cut")).to_have_count(1)  # the threshold is marked on the bar
    assert row.locator(".thumb img").evaluate("img => img.naturalWidth") > 0
    answer = httpx.post(f"{webapp}/api/predict", files={"file": films[2].read_bytes()}).json()
    expect(row.locator(".label-text")).to_have_text(answer["label"])
    expect(row.locator(".probability .value")).to_have_text(f"{answer['probability']:.1%}")
    fits_the_width(page)
    if page.viewport_name == "phone":  # the answer sits below the film, not beside it
        film_box = row.locator(".thumb img").bounding_box()
        probability_box = row.locator(".probability").bounding_box()
        assert probability_box["x"] + probability_box["width"] <= VIEWPORTS["phone"]["width"]
        assert probability_box["y"] >= film_box["y"]
    no_serious_violations(page)
    shoot(page, "02-one-film")


def test_a_set_with_a_bad_file_answers_the_rest_and_downloads_as_csv(page, webapp, films, tmp_path):
    bad = tmp_path / "notes.jpg"  # the extension lies; the bytes decide
    bad.write_text("not an x-ray")
    chosen = [str(films[0]), str(bad), str(films[1]), str(films[3])]
    page.goto(webapp)
    page.set_input_files("#file", chosen)
    page.click("button[type=submit]")
    wait_for_answers(page, 4)

    rows = page.locator("tr.film-row")
    expect(rows).to_have_count(4)
    expect(page.locator("#summary")).to_contain_text("1 could not be read")
    failed = rows.nth(1)
    expect(failed.locator(".filename")).to_have_text("notes.jpg")
    expect(failed.locator(".answer")).to_contain_text("not a JPEG, PNG or DICOM")
    for index in (0, 2, 3):
        expect(rows.nth(index).locator(".label-text")).to_have_text(LABEL)
    fits_the_width(page)
    no_serious_violations(page)
    shoot(page, "03-set-with-a-bad-file")
    if page.viewport_name == "phone":  # the narrowest screen the page is made for
        page.set_viewport_size({"width": 360, "height": 740})
        fits_the_width(page)

    with page.expect_download() as download:
        page.click("#csv")
    table = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    assert [row["file"] for row in table] == [Path(name).name for name in chosen]
    assert "not a JPEG, PNG or DICOM" in table[1]["error"] and not table[1]["label"]
    for index in (0, 2, 3):
        shown = rows.nth(index).locator(".probability .value").inner_text()
        assert f"{float(table[index]['probability']):.1%}" == shown
        assert table[index]["label"] == rows.nth(index).locator(".label-text").inner_text()
        assert table[index]["model_version"] == "1" and not table[index]["error"]


def test_a_single_bad_file_is_explained_next_to_the_form_in_the_apis_words(page, webapp, tmp_path):
    bad = tmp_path / "scan.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG cut short
    api = httpx.post(f"{webapp}/api/predict", files={"file": bad.read_bytes()})
    assert 400 <= api.status_code < 500
    page.goto(webapp)
    page.set_input_files("#file", str(bad))
    page.click("button[type=submit]")
    expect(page.locator("#error")).to_have_text(api.json()["detail"])
    shoot(page, "04-error")


def test_more_films_than_the_page_takes_are_refused_before_any_upload(page, webapp, tmp_path):
    names = []
    for index in range(51):  # HM_MAX_BATCH_FILES is 50
        path = tmp_path / f"film-{index}.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\n")
        names.append(str(path))
    page.goto(webapp)
    expect(page.locator("label[for=file]")).to_contain_text("up to 50 films at once")
    page.set_input_files("#file", names)
    page.click("button[type=submit]")
    expect(page.locator("#error")).to_have_text(
        "51 files were chosen; the page takes up to 50 at once. Choose fewer."
    )
    expect(page.locator("tr.film-row")).to_have_count(0)


def test_films_dropped_on_the_page_are_classified(page, webapp, films):
    page.goto(webapp)
    payload = [
        {"name": path.name, "data": base64.b64encode(path.read_bytes()).decode()}
        for path in films[:2]
    ]
    page.evaluate(
        """files => {
            const transfer = new DataTransfer();
            for (const {name, data} of files) {
                const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
                transfer.items.add(new File([bytes], name, {type: "image/png"}));
            }
            const zone = document.getElementById("drop-zone");
            zone.dispatchEvent(new DragEvent("dragenter", {bubbles: true, dataTransfer: transfer}));
            zone.dispatchEvent(new DragEvent("drop", {bubbles: true, dataTransfer: transfer}));
        }""",
        payload,
    )
    wait_for_answers(page, 2)
    names = page.locator("tr.film-row .filename")
    expect(names).to_have_text([path.name for path in films[:2]])
    expect(page.locator("tr.film-row .label-text")).to_have_count(2)
    shoot(page, "05-dropped")


def test_a_dicom_film_is_classified(page, webapp, films, tmp_path):
    pixels = cv2.imread(str(films[3]), cv2.IMREAD_GRAYSCALE).astype("uint16") * 16  # 12 bit
    film = tmp_path / "film.dcm"
    film.write_bytes(make_dicom(pixels, bits_stored=12))
    page.goto(webapp)
    page.evaluate(  # record every status the row shows while the film uploads
        """() => {
            window.seen = [];
            new MutationObserver(() => {
                for (const s of document.querySelectorAll("tr.film-row .status"))
                    if (s.textContent) window.seen.push(s.textContent);
            }).observe(document.querySelector("tbody"), {childList: true, subtree: true});
        }"""
    )
    page.set_input_files("#file", str(film))
    page.click("button[type=submit]")
    wait_for_answers(page, 1)
    seen = page.evaluate("window.seen")
    assert seen[0] == "waiting" and "classifying" in seen, seen
    row = page.locator("tr.film-row")
    expect(row.locator(".label-text")).to_have_text(LABEL)
    assert row.locator(".thumb img").evaluate("img => img.naturalWidth") > 0
    shoot(page, "06-dicom")


def test_the_heat_map_shows_where_the_model_looked(page, webapp, films):
    page.goto(webapp)
    page.set_input_files("#file", str(films[2]))
    page.click("button[type=submit]")
    wait_for_answers(page, 1)
    page.focus("button.explain")  # from the keyboard
    page.keyboard.press("Enter")
    heatmap = page.locator("tr.map-row figure.heatmap")
    expect(heatmap).to_be_visible()
    expect(heatmap.locator("figcaption")).to_contain_text("not where disease is")
    expect(heatmap.locator("figcaption")).to_contain_text("Model version 1")
    assert heatmap.locator("img").evaluate("img => img.naturalWidth") == 256
    expect(page.locator("button.explain")).to_have_attribute("aria-expanded", "true")
    fits_the_width(page)
    no_serious_violations(page)
    shoot(page, "07-heat-map")
    page.click("button.explain")  # a second click hides it
    expect(page.locator("tr.map-row")).to_have_count(0)


def test_about_this_model_names_its_data_metrics_and_links(page, webapp, trained, mlflow_server):
    settings, result = trained
    page.goto(webapp)
    about = page.locator("#about")
    expect(about.locator("#about-version")).to_have_text("1")
    expect(about.locator("#about-provenance")).to_have_attribute("data-kind", "synthetic")
    expect(about.locator("#about-data")).to_contain_text(re.compile(r"\d+ films\s+\(\d+ NORMAL"))
    expect(about.locator("#about-threshold")).to_contain_text("PNEUMONIA from")
    expect(about.locator("#about-metrics tbody tr").first).to_contain_text("Cross-validation")
    run_link = about.locator("#about-run").get_attribute("href")
    assert run_link.startswith(mlflow_server) and result.run_id in run_link
    version_link = about.locator("#about-version-link").get_attribute("href")
    assert version_link.endswith(f"/#/models/{settings.model_name}/versions/1")
    assert httpx.get(run_link.split("#")[0]).status_code == 200  # the MLflow UI answers there
    fits_the_width(page)
    shoot(page, "08-about")


def test_a_reader_signs_in_and_labels_each_answer(page, webapp, trained, films):
    settings, _ = trained
    name = f"reader-{page.viewport_name}"
    made = run_hm_mlflow(
        ["reviewer", "add", name, "--replace"],
        {"HM_STATE_DIR": str(settings.state_dir)},
        Path.cwd(),
    )
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    page.goto(webapp)
    page.fill("#site", f"ward-{page.viewport_name}")
    page.set_input_files("#file", [str(films[0]), str(films[1])])
    page.click("#upload button[type=submit]")
    wait_for_answers(page, 2)
    expect(page.locator("td.reader-label").first).to_be_hidden()  # not signed in: no control

    page.locator("#reader summary").click()
    page.fill("#reader-token", "hmr_" + "x" * 43)
    page.click("#reader-form button[type=submit]")
    expect(page.locator("#reader-status")).to_contain_text("not a reader's")
    page.fill("#reader-token", token)
    page.click("#reader-form button[type=submit]")
    expect(page.locator("#reader-status")).to_contain_text(f"Signed in as {name}")
    row = page.locator("tr.film-row").first
    choice = row.locator(".labels button", has_text="PNEUMONIA")
    choice.click()
    expect(row.locator(".label-status")).to_contain_text(f"Labelled PNEUMONIA by {name}")
    expect(choice).to_have_attribute("aria-pressed", "true")
    row.locator(".labels button", has_text="NORMAL").click()  # a second thought: the latest wins
    expect(row.locator(".label-status")).to_contain_text(f"Labelled NORMAL by {name}")
    fits_the_width(page)
    no_serious_violations(page)
    shoot(page, "10-reader-labels")

    labelled = [
        f for f in PredictionLog(settings.prediction_log_uri).labelled() if f.reviewer == name
    ]
    assert [(f.site, f.label) for f in labelled] == [(f"ward-{page.viewport_name}", "NORMAL")]
    history = PredictionLog(settings.prediction_log_uri).label_history(labelled[0].prediction_id)
    assert [h["label"] for h in history] == ["PNEUMONIA", "NORMAL"]


def test_the_monitoring_page_shows_each_site(page, webapp, films):
    for film in films:
        httpx.post(
            f"{webapp}/api/predict", files={"file": film.read_bytes()}, data={"site": "east"}
        ).raise_for_status()
    page.goto(f"{webapp}/monitoring")
    east = page.locator("section.site[data-site='east']")
    expect(east).to_contain_text("films answered")
    expect(east.locator("table.versions tbody tr")).to_have_count(1)
    expect(east.locator(".input-drift")).to_contain_text("too few films")
    expect(page.locator("#production-version")).to_have_text("1")
    fits_the_width(page)
    no_serious_violations(page)
    shoot(page, "11-monitoring")


@pytest.fixture(scope="module")
def plain_browser(playwright, tmp_path_factory):
    context = _launch(playwright, tmp_path_factory.mktemp("plain"), javascript=False)
    yield context
    context.close()


def test_without_javascript_the_form_still_answers_one_film(plain_browser, webapp, films):
    page = plain_browser.new_page()
    page.set_viewport_size(VIEWPORTS["phone"])
    page.viewport_name = "phone"
    page.goto(webapp)
    page.set_input_files("#file", str(films[3]))
    page.click("button[type=submit]")
    expect(page.locator("#label")).to_have_text(LABEL)
    expect(page.locator("#probability")).to_have_text(PERCENT)
    expect(page.locator("#result")).to_contain_text("model version 1")
    fits_the_width(page)
    shoot(page, "09-without-javascript")

    page.goto(webapp)
    note = {"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"not an x-ray"}
    page.set_input_files("#file", files=[note])
    page.click("button[type=submit]")
    expect(page.locator("#error")).to_contain_text("not a JPEG, PNG or DICOM")
    expect(page.locator("#result")).to_have_count(0)
    page.close()
