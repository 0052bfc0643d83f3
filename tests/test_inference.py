"""Predictor and CAMs: equal to plain pytorch-grad-cam, aligned with the upload, every input kind, threads."""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from safetensors.torch import save_file
from timm.data import create_transform, resolve_model_data_config

from conftest import REPO, data_root
from dermadetect.explain import CAM_METHODS, cam_on_image, project_cam, road_faithfulness
from dermadetect.hub import ModelSourceError, export_for_hub, load_model
from dermadetect.inference import (CorruptImageError, ImageTooLargeError, ImageTooSmallError, NotAnImageError,
                                   Predictor, open_image)
from dermadetect.labels import HAM10000_CLASSES
from dermadetect.config import DEFAULT_BACKBONES
from dermadetect.models import target_layer
from dermadetect.posthoc import PostHocSettings

BACKBONES = DEFAULT_BACKBONES + ("efficientnet_lite0",)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Random-weight models of each backbone exported in the Hub format, at 64 px."""
    dirs = {}
    for name in BACKBONES:
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=7)
        data_config = resolve_model_data_config(model)
        data_config["input_size"] = (3, 64, 64)
        dirs[name] = export_for_hub(model, name, HAM10000_CLASSES, data_config, tmp_path_factory.mktemp(name),
                                   PostHocSettings())
    return dirs


@pytest.fixture(scope="module")
def predictors(model_dirs):
    return {name: Predictor(str(folder)) for name, folder in model_dirs.items()}


def lesion_like(size=(300, 220), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.full((size[1], size[0], 3), (200, 160, 140), dtype=np.float32)
    yy, xx = np.mgrid[: size[1], : size[0]]
    blob = np.exp(-(((xx - size[0] * 0.55) / 40) ** 2 + ((yy - size[1] * 0.45) / 30) ** 2))
    base -= blob[..., None] * (120, 110, 90)
    return Image.fromarray(np.uint8(np.clip(base + rng.normal(0, 6, base.shape), 0, 255)))


@pytest.mark.parametrize("name", BACKBONES)
def test_cam_equals_plain_pytorch_grad_cam(predictors, name):
    predictor = predictors[name]
    pixels = predictor.preprocess(open_image(lesion_like()))
    reference_model = copy.deepcopy(predictor.loaded.model).requires_grad_(True)
    layer = target_layer(reference_model, name)
    with torch.no_grad():
        plain = reference_model(pixels).softmax(1)[0].numpy()
    for method, cam_class in CAM_METHODS.items():
        for class_index in (0, 4):
            ours = predictor.explainer(pixels, class_index, method)
            with cam_class(model=reference_model, target_layers=[layer]) as reference:
                expected = reference(pixels, targets=[ClassifierOutputTarget(class_index)])[0]
            np.testing.assert_allclose(ours.cam, expected, atol=1e-5, err_msg=f"{name} {method} {class_index}")
            np.testing.assert_allclose(ours.probabilities, plain, atol=1e-6)
            assert ours.cam.shape == (64, 64)
            assert ours.cam.min() >= 0.0 and ours.cam.max() <= 1.0 + 1e-6


def test_cam_faithfulness_does_not_depend_on_the_callers_random_state(predictors):
    """ROAD imputes with random noise: the scores (and so the served CAM method) are the same whatever the
    global generator's state, and that state is left as it was."""
    explainer = predictors["resnet18"].explainer
    pixels = torch.cat([predictors["resnet18"].preprocess(lesion_like(seed=s)) for s in range(2)])
    runs = []
    for state in (1, 2):
        torch.manual_seed(state)
        runs.append(road_faithfulness(explainer, pixels, methods=("gradcam", "eigencam")))
        after = torch.rand(1)
        torch.manual_seed(state)
        assert torch.equal(after, torch.rand(1))
    assert runs[0] == runs[1]
    other_seed = road_faithfulness(explainer, pixels, methods=("gradcam",), seed=1)
    assert other_seed["scores"]["gradcam"] != runs[0]["scores"]["gradcam"]  # the noise is there, and seeded


@pytest.mark.parametrize("name", BACKBONES)
def test_target_layer_is_the_end_of_forward_features(predictors, name):
    """The one-pass split relies on this: the registered layer's output is forward_features' output."""
    model = predictors[name].loaded.model
    seen = {}
    handle = target_layer(model, name).register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
    handle.remove()
    assert torch.equal(seen["out"], features)


@pytest.mark.parametrize("name", BACKBONES)
def test_explaining_another_class_changes_the_map(predictors, name):
    predictor = predictors[name]
    first = predictor.predict(lesion_like())
    other = next(label for label in predictor.label_names if label != first.top_label)
    second = predictor.predict(lesion_like(), explain=other)
    assert second.explained_label == other and first.explained_label == first.top_label
    assert not np.allclose(first.cam, second.cam, atol=1e-3)
    assert list(first.probabilities) == list(HAM10000_CLASSES)
    assert sum(first.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert first.overlay.size == (300, 220) and first.overlay.mode == "RGB"


def test_logit_adjustment_moves_the_call_not_the_probabilities(model_dirs, tmp_path):
    plain = Predictor(str(model_dirs["resnet18"])).predict(lesion_like())
    probs = np.array(list(plain.probabilities.values()))
    target = int(probs.argmin())
    prior = probs / 10 ** (np.arange(7) == target)  # a prior that makes the least probable class the call
    prior = prior / prior.sum()
    loaded = load_model(str(model_dirs["resnet18"]))
    for strength in (0.5, 1.0):
        folder = export_for_hub(loaded.model, "resnet18", HAM10000_CLASSES, loaded.data_config, tmp_path / str(strength),
                                PostHocSettings(class_prior=tuple(prior), adjustment_strength=strength))
        adjusted = Predictor(str(folder)).predict(lesion_like())
        expected = HAM10000_CLASSES[int((probs / prior ** strength).argmax())]
        assert adjusted.top_label == adjusted.explained_label == expected
        assert adjusted.probabilities == pytest.approx(plain.probabilities, abs=1e-6)
    assert adjusted.top_label == HAM10000_CLASSES[target] != plain.top_label


def test_export_carries_its_own_licence_and_versioned_settings(model_dirs, tmp_path):
    """The export's pretrained_cfg names these weights' terms (the card's CC BY-NC 4.0), not the ImageNet
    checkpoint's; a folder whose settings lack the schema version (an older export) is refused in plain words."""
    config = json.loads((model_dirs["efficientnet_lite0"] / "config.json").read_text())
    assert config["pretrained_cfg"]["license"] == "cc-by-nc-4.0" and config["pretrained_cfg"]["tag"] == "ham10000"
    assert config["dermadetect"]["schema_version"] == 2
    old = shutil.copytree(model_dirs["resnet18"], tmp_path / "old")
    del config["dermadetect"]["schema_version"]
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match="schema version"):
        load_model(str(old))
    # a guard file of the Mahalanobis-only kind (schema 1) beside current settings: refused, saying what to do
    mixed = shutil.copytree(model_dirs["resnet18"], tmp_path / "mixed")
    config = json.loads((mixed / "config.json").read_text())
    config["dermadetect"]["ood_threshold"] = 10.0
    (mixed / "config.json").write_text(json.dumps(config))
    save_file({"means": torch.zeros(7, 512), "precision": torch.eye(512)}, str(mixed / "ood.safetensors"))
    with pytest.raises(ModelSourceError, match="older out-of-distribution file.*export the model again"):
        load_model(str(mixed))


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if key == "ood_threshold":
            config["dermadetect"][key] = value
        elif value is None:
            del config[key]
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def penultimate_only_guard(folder):
    """A guard of the previous kind, which scored the penultimate features alone (512 for resnet18)."""
    edit_config(folder, ood_threshold=1.0)
    save_file({"means": torch.zeros(7, 512), "precision": torch.eye(512), "centre": torch.zeros(513),
               "scale": torch.ones(513), "weight": torch.zeros(513), "bias": torch.zeros(())},
              str(folder / "ood.safetensors"))


DAMAGED_FOLDERS = {
    "config.json cannot be read": lambda f: (f / "config.json").write_text('{"label_names": ["akiec", '),
    "config.json is not a timm model config": lambda f: (f / "config.json").write_text('["resnet18"]'),
    "config.json has no architecture": lambda f: edit_config(f, architecture=None),
    "cannot build no_such_net": lambda f: edit_config(f, architecture="no_such_net"),
    "model.safetensors cannot be read": lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:1000]),
    "ood.safetensors cannot be read": lambda f: (edit_config(f, ood_threshold=1.0),
                                                 (f / "ood.safetensors").write_bytes(b"\x00" * 16)),
    "guard was fitted on 512 features per image but this network gives 1280": penultimate_only_guard,
}


@pytest.mark.parametrize("why", DAMAGED_FOLDERS)
def test_damaged_model_folder_is_refused_in_plain_words(model_dirs, tmp_path, why):
    """A half-copied or damaged folder (or one from a newer timm) is a ModelSourceError that names the file and
    what to do, which the app and the CLI show as one line, never a library's own exception."""
    folder = shutil.copytree(model_dirs["resnet18"], tmp_path / "damaged")
    DAMAGED_FOLDERS[why](folder)
    with pytest.raises(ModelSourceError, match=why) as caught:
        load_model(str(folder))
    assert "again" in str(caught.value)


@pytest.mark.parametrize("size", [(640, 360), (300, 500)])
def test_cam_lands_on_the_right_pixels_of_a_non_square_image(model_dirs, size):
    """A marker placed in the original image is found in the model's input tensor (through the real eval
    transform); a CAM peaking there must project back onto the marker."""
    loaded = load_model(str(model_dirs["resnet18"]))
    width, height = size
    marker = (int(width * 0.62), int(height * 0.41))
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[marker[1] - 3:marker[1] + 4, marker[0] - 3:marker[0] + 4] = 255
    pixels = create_transform(**loaded.data_config, is_training=False)(Image.fromarray(image))
    intensity = pixels[0].numpy()
    peak_y, peak_x = np.unravel_index(intensity.argmax(), intensity.shape)
    yy, xx = np.mgrid[: intensity.shape[0], : intensity.shape[1]]
    cam = np.exp(-((xx - peak_x) ** 2 + (yy - peak_y) ** 2) / 4.0)
    full, _ = project_cam(cam, (width, height), loaded.data_config)
    found_y, found_x = np.unravel_index(full.argmax(), full.shape)
    tolerance = 0.03 * max(width, height)
    assert abs(found_x - marker[0]) <= tolerance and abs(found_y - marker[1]) <= tolerance


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def accepted_uploads():
    rgb = lesion_like((120, 90))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.new("L", rgb.size, 0))  # fully transparent: must come out white
    exif = rgb.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    frames = [rgb, rgb.transpose(Image.FLIP_LEFT_RIGHT)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    return {
        "jpeg": (encoded(rgb, "JPEG"), (120, 90)),
        "png-rgba-transparent": (encoded(rgba, "PNG"), (120, 90)),
        "webp": (encoded(rgb, "WEBP"), (120, 90)),
        "bmp": (encoded(rgb, "BMP"), (120, 90)),
        "tiff": (encoded(rgb, "TIFF"), (120, 90)),
        "gif-animated": (gif.getvalue(), (120, 90)),
        "png-la": (encoded(rgb.convert("LA"), "PNG"), (120, 90)),
        "png-l": (encoded(rgb.convert("L"), "PNG"), (120, 90)),
        "png-p": (encoded(rgb.convert("P"), "PNG"), (120, 90)),
        "jpeg-cmyk": (encoded(rgb.convert("CMYK"), "JPEG"), (120, 90)),
        "jpeg-exif-rotated": (encoded(rgb, "JPEG", exif=exif), (90, 120)),
        "png-32px": (encoded(rgb.resize((32, 40)), "PNG"), (32, 40)),
    }


@pytest.mark.parametrize("kind", list(accepted_uploads()))
def test_accepted_uploads_give_valid_results(predictors, kind):
    data, expected_size = accepted_uploads()[kind]
    result = predictors["resnet18"].predict(data)
    assert result.image_size == expected_size and result.overlay.size == expected_size
    assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert np.isfinite(result.cam).all()


def test_transparent_png_is_composited_on_white():
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    assert open_image(encoded(rgba, "PNG")).getpixel((10, 10)) == (255, 255, 255)


def test_sixteen_bit_is_scaled_not_clipped():
    array = np.array([[0, 32768, 65535] * 16] * 48, dtype=np.uint16)
    image = open_image(encoded(Image.fromarray(array), "PNG"))
    assert [image.getpixel((i, 0))[0] for i in range(3)] == [0, 128, 255]


def test_rejected_uploads_raise_typed_readable_errors(tmp_path):
    rgb = lesion_like((120, 90))
    truncated = encoded(rgb, "JPEG")
    cases = {
        b"just some text, not a picture": NotAnImageError,
        b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\n": NotAnImageError,
        truncated[: len(truncated) // 2]: CorruptImageError,
        encoded(rgb.resize((31, 200)), "PNG"): ImageTooSmallError,
        encoded(Image.new("RGB", (40, 30000)), "PNG"): ImageTooSmallError,  # a sliver once fitted to 1024 px
        encoded(Image.new("1", (9000, 8000)), "PNG"): ImageTooLargeError,
    }
    for data, error in cases.items():
        with pytest.raises(error) as caught:
            open_image(data)
        assert "upload" in str(caught.value) or "pixels" in str(caught.value)
    with pytest.raises(NotAnImageError, match="does not exist"):
        open_image(tmp_path / "missing.jpg")


def test_overlay_opacity_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="opacity"):
        cam_on_image(np.zeros((8, 8)), lesion_like((64, 64)), {"input_size": (3, 8, 8), "crop_pct": 1.0}, 1.5)


def test_large_jpeg_is_decoded_at_reduced_scale():
    big = Image.fromarray(np.uint8(np.random.default_rng(0).integers(0, 255, (6000 // 8, 8000 // 8, 3))))
    data = encoded(big.resize((8000, 6000), Image.NEAREST), "JPEG", quality=70)
    with Image.open(io.BytesIO(data)) as probe:
        probe.draft("RGB", (512, 512))
        assert probe.size == (1000, 750)  # the JPEG decoder's own 1/8 scale
    image = open_image(data)
    assert image.size == (1000, 750)
    assert open_image(data, working_side=400).size == (400, 300)


def test_concurrent_calls_match_sequential(predictors):
    predictor = predictors["convnextv2_nano"]
    uploads = [encoded(lesion_like(seed=s), "PNG") for s in range(6)]
    sequential = [predictor.predict(u, method="gradcam++") for u in uploads]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda u: predictor.predict(u, method="gradcam++"), uploads * 2))
    for i, result in enumerate(parallel):
        expected = sequential[i % len(uploads)]
        assert result.probabilities == pytest.approx(expected.probabilities, abs=1e-6)
        np.testing.assert_allclose(result.cam, expected.cam, atol=1e-5)


def test_full_size_originals_and_cli(model_dirs, tmp_path):
    root = data_root()
    if root is None or not (root / "ham10000-originals").is_dir():
        pytest.skip("DERMADETECT_DATA with ham10000-originals/ is not set")
    images = sorted((root / "ham10000-originals").glob("*.jpg"))[:3]
    (tmp_path / "twin").mkdir()  # the same file name in another folder gets its own overlay
    images.append(Path(shutil.copy(images[0], tmp_path / "twin" / images[0].name)))
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    result = subprocess.run([sys.executable, "-m", "dermadetect", "predict", *map(str, images), str(bad),
                             "--model", str(model_dirs["efficientnet_b0"]), "--cam-method", "layercam",
                             "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr[-2000:]  # one input failed, and said so
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["image"] for line in lines] == [*map(str, images), str(bad)]
    for line, path in zip(lines[:4], images):
        assert set(line["probabilities"]) == set(HAM10000_CLASSES)
        with Image.open(line["overlay"]) as overlay, Image.open(path) as original:
            assert overlay.size == original.size
    assert len({line["overlay"] for line in lines[:4]}) == 4
    assert lines[4]["error_type"] == "NotAnImageError" and "upload" in lines[4]["error"]


@pytest.mark.parametrize("command", [["-m", "dermadetect", "predict", "x.jpg"], ["app.py"]])
def test_unreachable_model_is_one_line_and_exit_code_2(command, tmp_path):
    """A model the user named that cannot be had: one plain line, exit code 2, no traceback, no bundled swap."""
    with socket.socket() as s:  # a port nobody listens on: the Hub does not answer
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    result = subprocess.run([sys.executable, *command, "--model", "hf-hub:derma/missing"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: cannot get derma/missing@main: the Hub is not reachable and it is not in the local "
                      "cache. Connect once to fill the cache, or pass a local model folder instead"]
    assert "Traceback" not in result.stderr
