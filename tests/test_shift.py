"""The upload shifts (dermadetect.shift) and the robustness benchmark that scores a served model under them."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.transforms import v2 as T

from conftest import REPO
from dermadetect.inference import Predictor
from dermadetect.pipeline import GUARD_VIEWS, Framings
from dermadetect.shift import DEGRADATIONS, RandomShift, colour_cast, rescale, stretch

BUNDLED = next((REPO / "models").glob("dermadetect-*"))


def stripes(width: int = 224, period: int = 4) -> Image.Image:
    """Vertical black and white stripes `period` px wide: fine detail with a known geometry."""
    row = ((np.arange(width) // period) % 2 * 255).astype(np.uint8)
    return Image.fromarray(np.repeat(np.tile(row, (width, 1))[..., None], 3, axis=2))


def test_every_degradation_keeps_size_and_mode_and_changes_pixels():
    image = stripes()
    for name, degrade in DEGRADATIONS.items():
        out = degrade(image)
        assert out.size == image.size and out.mode == "RGB", name
        assert not np.array_equal(np.asarray(out), np.asarray(image)), name


def test_downscale_removes_detail_finer_than_its_resolution():
    image = stripes(period=1)  # one-pixel stripes: gone below 224 px
    contrast = {side: np.asarray(rescale(image, side), dtype=float).std() for side in (224, 180, 128)}
    assert contrast[224] == pytest.approx(127.5, abs=0.5)  # at full size nothing changes
    assert contrast[128] < contrast[180] < 0.5 * contrast[224]


def test_stretch_widens_the_content_by_the_aspect():
    out = np.asarray(stretch(stripes(period=12), 4 / 3))[112, :, 0] > 127
    runs = np.diff(np.flatnonzero(np.diff(out.astype(int))))
    assert np.median(runs) == pytest.approx(16, abs=1)  # 12 px stripes become 16 px


def test_colour_cast_scales_each_channel():
    out = colour_cast(Image.new("RGB", (8, 8), (200, 100, 50)), (1.12, 1.0, 0.82))
    assert out.getpixel((3, 3)) == (224, 100, 41)


def bundled_examples(ham224) -> tuple[list[Path], list[str]]:
    """The bundled model's example images (listed in examples.json, read from the data folder) and their labels."""
    entries = json.loads((BUNDLED / "examples.json").read_text())
    return [ham224 / "test" / Path(e["file"]).name for e in entries], [e["label"] for e in entries]


def test_random_shift_is_seeded_and_off_at_zero(ham224):
    image = Image.open(bundled_examples(ham224)[0][0]).convert("RGB")
    assert RandomShift(0.0)(image) is image
    draws = []
    for _ in range(2):
        random.seed(7)
        draws.append(np.asarray(RandomShift(1.0)(image)))
    assert np.array_equal(*draws) and not np.array_equal(draws[0], np.asarray(image))


def test_framings_are_the_photo_as_taken_then_other_views_the_same_every_time(tmp_path):
    """The guard's negatives: view 0 of a photo is the photo as an upload is served, the other views are other
    framings, each the same on every pass (the guard's fit is reproducible), whether the photo is a file or an
    image in memory."""
    transform = T.Compose([T.Resize((64, 64)), T.PILToTensor()])
    picture = stripes(300)
    stripes(200).save(tmp_path / "photo.png")
    framings = Framings([picture, tmp_path / "photo.png"], transform)
    assert len(framings) == 2 * (GUARD_VIEWS + 1)
    assert [framings[i]["label"] for i in range(len(framings))] == [0] * 9 + [1] * 9
    assert framings[0]["pixel_values"].equal(transform(picture))
    with Image.open(tmp_path / "photo.png") as photo:
        assert framings[GUARD_VIEWS + 1]["pixel_values"].equal(transform(photo.convert("RGB")))
    views = [framings[i]["pixel_values"] for i in range(1, GUARD_VIEWS + 1)]
    assert all(not view.equal(framings[0]["pixel_values"]) for view in views)
    assert all(view.equal(framings[i + 1]["pixel_values"]) for i, view in enumerate(views))


def test_benchmark_scores_as_the_predictor_serves(ham224, tmp_path):
    """The benchmark's batched served call (TTA, temperature, class-balanced call, melanoma threshold, guard) equals
    the Predictor's, one image at a time, on the bundled model and its examples."""
    spec = importlib.util.spec_from_file_location("bench_robustness", REPO / "benchmarks" / "bench_robustness.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    predictor = Predictor(str(BUNDLED))
    paths, words = bundled_examples(ham224)
    labels = np.array([predictor.label_names.index(word) for word in words])
    degrade = DEGRADATIONS["downscale_128"]
    for name in ("clean", "downscale_128"):
        inputs = paths
        if name != "clean":  # the Predictor is handed the degraded files
            inputs = []
            for path in paths:
                degraded = tmp_path / path.name.replace(".jpg", ".png")
                degrade(Image.open(path).convert("RGB")).save(degraded)
                inputs.append(degraded)
        served = [predictor.predict(p) for p in inputs]
        batched = bench.served_outputs(predictor.loaded, paths, None if name == "clean" else degrade, 4, 0)
        np.testing.assert_allclose(batched["probs"], [list(r.probabilities.values()) for r in served], atol=1e-5)
        assert [predictor.label_names[c] for c in batched["calls"]] == [r.top_label for r in served]
        np.testing.assert_allclose(batched["ood_scores"], [r.ood_score for r in served], rtol=1e-4)
        result = bench.score(predictor.loaded, paths, labels, None if name == "clean" else degrade, 4, 0)
        calls = np.array([predictor.label_names.index(r.top_label) for r in served])
        assert result["balanced_accuracy"] == pytest.approx(bench.balanced_accuracy(labels, calls))
        assert result["ood_flagged"] == pytest.approx(np.mean([r.out_of_distribution for r in served]))
