"""The Gradio demo: the handler on real images, the launched app over real HTTP (gradio_client), a real browser
(headless Chromium through Playwright), and a burst of concurrent requests against the bounded queue."""

from __future__ import annotations

import json
import os
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

import app
from conftest import REPO, data_root
from dermadetect.inference import Predictor
from dermadetect.labels import readable_name

SCREENSHOT = REPO / "artifacts" / "app_screenshot.png"


@pytest.fixture(scope="module")
def originals() -> list[Path]:
    root = data_root()
    if root is None or not (root / "ham10000-originals").is_dir():
        pytest.skip("DERMADETECT_DATA with ham10000-originals/ is not set")
    return sorted((root / "ham10000-originals").glob("*.jpg"))[:4]


@pytest.fixture(scope="module")
def predictor(tiny_export) -> Predictor:
    return Predictor(str(tiny_export))


@pytest.fixture(scope="module")
def served(predictor):
    """The real app, launched on a free port; yields (url, demo)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = app.build_demo(predictor)
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", demo
    demo.close()


def readable_labels(predictor) -> set[str]:
    return {readable_name(n) for n in predictor.label_names}


def test_handler_on_real_images(predictor, originals):
    handler = app.make_handler(predictor)
    for path in originals:
        chart, overlay_path, summary, withheld, (analysed, cam, _) = handler(str(path))
        assert isinstance(withheld, bool) and analysed == str(path) and cam.ndim == 2
        assert set(chart) == readable_labels(predictor) and len(chart) == 7
        assert sum(chart.values()) == pytest.approx(1.0, abs=1e-5)
        with Image.open(path) as original, Image.open(overlay_path) as overlay:
            assert overlay.size == original.size and overlay.mode == "RGB"
        assert "not a diagnosis" in summary


def test_reused_overlay_file_is_not_pruned(tmp_path, monkeypatch):
    """An overlay identical to one written over an hour ago reuses that file and must keep it."""
    monkeypatch.setattr(app, "OVERLAY_DIR", tmp_path)
    image = Image.new("RGB", (64, 48), (200, 100, 50))
    first = Path(app.save_overlay(image))
    stale = first.stat().st_mtime - 7200
    os.utime(first, (stale, stale))
    old = tmp_path / "0123.jpg"
    old.write_bytes(b"x")
    os.utime(old, (stale, stale))
    again = Path(app.save_overlay(image))
    assert again == first and again.is_file() and again.stat().st_mtime > stale + 3600
    assert not old.exists()  # other stale overlays are removed
    with Image.open(again) as reread:
        assert reread.size == (64, 48)


def page_texts(demo) -> str:
    return " ".join(str(b.value) for b in demo.blocks.values() if isinstance(getattr(b, "value", None), str))


def test_page_shows_disclaimer_model_and_examples(served, predictor):
    url, demo = served
    texts = page_texts(demo)
    assert "never diagnoses" in texts
    assert "`convnextv2_atto`" in texts and str(predictor.loaded.folder) not in texts  # named, not a local path
    assert len(app.find_examples(predictor)) == 3  # from examples.json in the model folder


def assert_page_leads_with_the_served_figures(folder: Path) -> None:
    """The figures as served lead, from the analysis the model ships with; the network alone (from its card)
    comes second."""
    texts = page_texts(app.build_demo(Predictor(str(folder))))
    served = json.loads((folder / "analysis.json").read_text())["bootstrap"]["test"]
    assert texts.index(f"balanced accuracy {served['balanced_accuracy']['value']:.3f}") < texts.index(
        "The network alone")


def test_bundled_page_leads_with_the_served_figures():
    assert_page_leads_with_the_served_figures(app.BUNDLED_MODEL)


def test_page_of_a_new_export_leads_with_the_served_figures(smoke_run):
    assert_page_leads_with_the_served_figures(smoke_run / "convnextv2_nano" / "export")


def another_class(predictor, image) -> str:
    """A class other than the model's call on `image`: explaining it must draw another map."""
    call = predictor.predict(image).explained_label
    return next(name for name in predictor.label_names if name != call)


def test_api_over_http(served, predictor, originals, tmp_path):
    url, _ = served
    client = Client(url, verbose=False)
    other = another_class(predictor, originals[0])
    assert predictor.default_method != "layercam"
    chart, overlay_path, summary = client.predict(handle_file(str(originals[0])), "layercam", other, 0.7,
                                                  api_name="/predict")
    assert {c["label"] for c in chart["confidences"]} == {readable_name(n) for n in
                                                         ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")}
    with Image.open(overlay_path) as overlay, Image.open(originals[0]) as original:
        assert overlay.size == original.size
    default = client.predict(handle_file(str(originals[0])), api_name="/predict")
    assert default[0]["label"] == chart["label"]  # same image, same top class
    with Image.open(default[1]) as a, Image.open(overlay_path) as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))  # another class and method: another map

    text = tmp_path / "notes.txt"
    text.write_text("this is not an image")
    truncated = tmp_path / "truncated.jpg"
    data = originals[1].read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    huge = tmp_path / "huge.png"
    Image.new("1", (9000, 8000)).save(huge)
    for path, expected in ((text, "not an image"), (truncated, "damaged or truncated"), (huge, "megapixel")):
        with pytest.raises(Exception) as caught:
            client.predict(handle_file(str(path)), api_name="/predict")
        assert expected in str(caught.value)
    still = client.predict(handle_file(str(originals[2])), api_name="/predict")
    assert len(still[0]["confidences"]) == 7


def test_burst_of_requests_is_answered_or_refused(served, originals):
    """40 concurrent requests against a queue of 16: each is answered correctly or refused as queue-full;
    none is lost or hangs, and the app answers afterwards."""
    url, _ = served
    image = handle_file(str(originals[0]))

    def call(_):
        try:
            result = Client(url, verbose=False).predict(image, api_name="/predict")
            return "ok" if len(result[0]["confidences"]) == 7 else "wrong"
        except Exception as exc:
            return "full" if "queue is full" in str(exc).lower() else f"error: {exc}"

    with ThreadPoolExecutor(max_workers=40) as pool:
        outcomes = list(pool.map(call, range(40), timeout=600))
    counts = {k: outcomes.count(k) for k in set(outcomes)}
    assert set(counts) <= {"ok", "full"}, counts
    assert counts.get("ok", 0) >= 16
    print(f"burst of 40: {counts}")
    assert len(Client(url, verbose=False).predict(image, api_name="/predict")[0]["confidences"]) == 7


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield browser
        browser.close()


def analyse(page, url: str, image: Path) -> None:
    page.goto(url)  # not "networkidle": the page keeps a heartbeat open for its session state
    page.wait_for_selector("#analyse", timeout=60_000)
    page.locator("#upload input[type=file]").set_input_files(str(image))
    page.wait_for_selector("#upload img", timeout=60_000)
    page.click("#analyse")
    page.wait_for_function("document.querySelector('#summary').innerText.includes('diagnosis')", timeout=120_000)


def test_real_browser_upload_and_live_settings(served, predictor, originals, browser):
    url, _ = served
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    analyse(page, url, originals[0])
    assert "never diagnoses" in page.inner_text("#disclaimer")
    page.wait_for_selector("#overlay img", timeout=120_000)
    page.wait_for_function("document.querySelector('#labels').innerText.includes('%')", timeout=60_000)
    labels_text = page.inner_text("#labels")
    assert sum(name in labels_text for name in ("Melanoma (mel)", "Melanocytic nevus (nv)")) == 2
    assert page.locator("#overlay img").evaluate("img => img.naturalWidth") > 0
    assert "not a diagnosis" in page.inner_text("#summary") and "call is" in page.inner_text("#summary")
    labels, overlay = (page.locator(f"#{box}").bounding_box() for box in ("labels", "overlay"))
    assert labels["x"] + labels["width"] <= overlay["x"] + 1  # desktop: side by side
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    # another class to explain redraws the overlay at once, without Analyse; the dropdown reads in words
    before = page.locator("#overlay img").get_attribute("src")
    page.get_by_text("Explanation settings").click()
    page.locator("#explain-class input").click()
    page.get_by_role("option", name=readable_name(another_class(predictor, originals[0]))).click()
    # overlays are files named by their content: a new name is a new picture
    page.wait_for_function(f"document.querySelector('#overlay img').src !== {before!r}", timeout=120_000)
    page.close()


def test_phone_layout_stacks_chart_over_overlay(served, originals, browser):
    url, _ = served
    page = browser.new_page(viewport={"width": 400, "height": 900})
    analyse(page, url, originals[1])
    page.wait_for_selector("#overlay img", timeout=120_000)
    labels, overlay = (page.locator(f"#{box}").bounding_box() for box in ("labels", "overlay"))
    assert labels["y"] + labels["height"] <= overlay["y"] + 1  # the chart above the overlay, no overlap
    for box in (labels, overlay):
        assert box["width"] >= 0.9 * 400 - 40  # the full width, less the page's margins
    # every percentage of the chart is on screen, not cut off
    for row in page.locator("#labels .confidence-set, #labels [data-testid='label-output-value']").all():
        edge = row.bounding_box()
        assert edge["x"] >= 0 and edge["x"] + edge["width"] <= 400
    assert page.inner_text("#labels").count("%") == 7
    page.screenshot(path=str(SCREENSHOT.with_name("app_phone.png")), full_page=True)
    page.close()


@pytest.fixture(scope="module")
def bundled_served():
    """The app serving the bundled model (whose guard is fitted on real data), launched on a free port."""
    predictor = Predictor(str(app.BUNDLED_MODEL))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = app.build_demo(predictor)
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", predictor
    demo.close()


def test_not_dermoscopy_withholds_the_scores(bundled_served, browser, tmp_path):
    """A picture the bundled model's guard flags: chart and overlay withheld behind a message, until asked."""
    from skimage import data as samples

    url, predictor = bundled_served
    photo = tmp_path / "astronaut.png"
    Image.fromarray(samples.astronaut()).save(photo)
    assert predictor.predict(str(photo)).out_of_distribution  # the precondition: the guard flags it
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    analyse(page, url, photo)
    assert "scores are withheld" in page.inner_text("#summary")
    page.wait_for_selector("#show-anyway", state="visible", timeout=30_000)
    assert page.locator("#labels").is_hidden() and page.locator("#overlay").is_hidden()
    page.screenshot(path=str(SCREENSHOT.with_name("app_withheld.png")), full_page=True)
    page.click("#show-anyway")
    page.wait_for_selector("#labels", state="visible", timeout=30_000)
    assert page.inner_text("#labels").count("%") == 7
    page.wait_for_function("document.querySelector('#summary').innerText.includes('because you asked')",
                           timeout=30_000)
    assert "call is" in page.inner_text("#summary")
    page.close()


def test_oversized_upload_is_refused_with_the_limit(bundled_served, browser, tmp_path):
    """A file over the upload limit never reaches the server; Analyse afterwards names the limit instead of
    pretending nothing was uploaded."""
    url, _ = bundled_served
    big = tmp_path / "big.png"  # incompressible noise: a PNG over the limit
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (3000, 3000, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > app.MAX_UPLOAD_MB * 1e6
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.wait_for_selector("#analyse", timeout=60_000)
    page.locator("#upload input[type=file]").set_input_files(str(big))
    page.wait_for_function("document.body.innerText.includes('exceed the maximum allowed size')", timeout=30_000)
    assert page.locator("#upload img").count() == 0
    page.click("#analyse")
    page.wait_for_function(f"document.body.innerText.includes('at most {app.MAX_UPLOAD_MB} MB')", timeout=30_000)
    page.close()


def test_opacity_change_reblends_the_cached_cam(predictor, originals):
    """The page's opacity change draws the CAM again without the model: the same overlay as a new predict."""
    path = str(originals[0])
    first = predictor.predict(path, opacity=0.5)
    again = predictor.predict(path, opacity=0.2)
    assert np.array_equal(np.asarray(predictor.overlay(path, first.cam, 0.2)), np.asarray(again.overlay))
    assert not np.array_equal(np.asarray(first.overlay), np.asarray(again.overlay))  # the opacity is drawn


def test_default_falls_back_to_bundled_model_offline(tiny_export, monkeypatch, tmp_path):
    monkeypatch.delenv("DERMADETECT_MODEL", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr(app, "BUNDLED_MODEL", tiny_export)
    # an empty cache: huggingface_hub reads HF_HOME at import, so its constant is what counts
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-hf-home"))
    predictor, notice = app.load_predictor(None)
    assert predictor.loaded.folder == tiny_export
    assert notice == (f"The published model ({app.HUB_MODEL[len('hf-hub:'):]}) is not cached here and the Hugging "
                      "Face Hub is switched off here (HF_HUB_OFFLINE=1), so this page serves the bundled model instead.")
    page = app.build_demo(predictor, notice)
    assert any(notice in str(getattr(b, "value", "")) for b in page.blocks.values())


def test_explicit_model_is_never_swapped(monkeypatch, tmp_path):
    monkeypatch.delenv("DERMADETECT_MODEL", raising=False)
    with pytest.raises(Exception, match="does not exist"):
        app.load_predictor(str(tmp_path / "no-such-model"))


def test_upload_bytes_are_not_decoded_by_gradio(tmp_path):
    """UploadPath hands over the file untouched, so even a non-image reaches the Predictor's checks."""
    from gradio.data_classes import ImageData

    path = tmp_path / "x.txt"
    path.write_text("not an image")
    component = app.UploadPath(type="filepath", image_mode=None)
    assert component.preprocess(ImageData(path=str(path), orig_name="x.txt")) == str(path)


def test_summary_warns_on_non_dermoscopy_and_names_the_melanoma_threshold():
    from dermadetect.inference import Prediction

    labels = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    probabilities = dict(zip(labels, (0.02, 0.03, 0.05, 0.01, 0.30, 0.58, 0.01)))

    def summary(ood: bool, flag: bool) -> str:
        result = Prediction(probabilities=probabilities, top_label="nv", explained_label="nv",
                            cam=np.zeros((4, 4)), overlay=Image.new("RGB", (4, 4)), image_size=(4, 4),
                            ood_score=1.0, out_of_distribution=ood, melanoma_flag=flag)
        return app.summary_line(result, labels)

    assert "does not look like a dermoscopy image" in summary(True, True)
    assert "screening threshold" not in summary(True, True)  # no melanoma talk about a picture of a cat
    assert "screening threshold" in summary(False, True) and "85%" in summary(False, True)
    assert "Its highest probability" not in summary(False, False)  # the call is the most probable class
    moved = Prediction(probabilities=probabilities, top_label="mel", explained_label="mel", cam=np.zeros((4, 4)),
                       overlay=Image.new("RGB", (4, 4)), image_size=(4, 4))
    assert "call is **Melanoma (mel)** (30%)" in app.summary_line(moved, labels)
    assert "highest probability is Melanocytic nevus (nv) (58%)" in app.summary_line(moved, labels)
    plain = summary(False, False)
    assert "screening threshold" not in plain and "dermoscopy image" not in plain and "not a diagnosis" in plain


def test_bundled_examples_are_read_from_the_data_folder(ham224, monkeypatch):
    """The bundled model lists its examples but carries no dataset images: they come from DERMADETECT_DATA."""
    monkeypatch.setenv("DERMADETECT_DATA", str(ham224.parent))
    listed = json.loads((app.BUNDLED_MODEL / "examples.json").read_text())
    found = app.find_examples(Predictor(str(app.BUNDLED_MODEL)))
    assert found == [[str(ham224 / "test" / Path(e["file"]).name)] for e in listed] and len(found) == 7


def test_example_listing_cannot_reach_outside_the_model_folder(tmp_path, monkeypatch):
    """examples.json arrives with a downloaded model: an entry naming another file of the server is not served
    (Gradio would copy it into its cache and hand out a public URL)."""
    monkeypatch.setenv("DERMADETECT_DATA", str(tmp_path / "data"))
    folder = tmp_path / "model"
    (folder / "examples").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(folder / "examples" / "lesion.jpg")
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"a token")
    entries = ["examples/lesion.jpg", str(secret), "../secret.jpg", "examples/../../secret.jpg"]
    (folder / "examples.json").write_text(json.dumps([{"file": e} for e in entries]))
    found = app.find_examples(SimpleNamespace(loaded=SimpleNamespace(folder=folder)))
    assert found == [[str(folder / "examples" / "lesion.jpg")]]
