"""Cost of the CAM over a bare forward pass, per backbone, and the cost of very large uploads.

For each backbone at 224 px, 2 threads, batch 1, the same image, in one process: median ms of
  (a) a bare torch.inference_mode() forward,
  (b) the Predictor's label + CAM (one pass: CamExplainer),
  (c) plain pytorch-grad-cam GradCAM label + CAM,
  (d) (b) with the 8-view test-time augmentation a study may switch on (probabilities from 8 views, CAM of one),
and the ratios b/a, c/a and d/a. Then, for the first backbone, the full Predictor.predict on a 600x450 JPEG and
an 8000x6000 JPEG: the time ratio and the peak memory the large one adds (ru_maxrss, in a fresh process).

    python benchmarks/bench_explain.py [--backbones ...] [--repeats 30]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from timm.data import resolve_model_data_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dermadetect.explain import CamExplainer  # noqa: E402
from dermadetect.hub import export_for_hub  # noqa: E402
from dermadetect.posthoc import TTA_VIEWS, PostHocSettings  # noqa: E402
from dermadetect.inference import Predictor, open_image  # noqa: E402
from dermadetect.labels import HAM10000_CLASSES  # noqa: E402
from dermadetect.config import DEFAULT_BACKBONES  # noqa: E402
from dermadetect.models import target_layer  # noqa: E402


def median_ms(*fns, repeats: int, warmup: int = 3) -> list[float]:
    """Median milliseconds of each function, timed in rotation so that background load hits all alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            bucket.append((time.perf_counter() - start) * 1000)
    return [statistics.median(bucket) for bucket in times]


def test_image(size=(600, 450), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (size[1] // 50 + 1, size[0] // 50 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize(size, Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def export_random(name: str, folder: Path) -> Path:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=len(HAM10000_CLASSES))
    return export_for_hub(model, name, HAM10000_CLASSES, resolve_model_data_config(model), folder / name,
                          PostHocSettings())


def bench_backbone(name: str, folder: Path, repeats: int) -> dict:
    predictor = Predictor(str(export_random(name, folder)))
    pixels = predictor.preprocess(open_image(test_image()))
    model = predictor.loaded.model

    def bare():
        with torch.inference_mode():
            model(pixels).softmax(1)

    def one_pass():
        predictor.explainer(pixels, None, "gradcam")

    reference_model = timm.create_model(name, num_classes=len(HAM10000_CLASSES))
    reference_model.load_state_dict(model.state_dict())
    reference_model.eval()
    plain_cam = GradCAM(model=reference_model, target_layers=[target_layer(reference_model, name)])

    def plain():
        cam = plain_cam(pixels, targets=None)  # targets=None: explain the top class, as (b) does
        plain_cam.outputs.softmax(1)
        return cam

    tta = CamExplainer(model, name, PostHocSettings(tta_views=TTA_VIEWS))

    def one_pass_tta():
        tta(pixels, None, "gradcam")

    a, b, c, d = median_ms(bare, one_pass, plain, one_pass_tta, repeats=repeats)
    return {"backbone": name, "input": list(pixels.shape), "threads": torch.get_num_threads(),
            "bare_forward_ms": round(a, 2), "predictor_label_cam_ms": round(b, 2),
            "plain_gradcam_label_cam_ms": round(c, 2), "predictor_tta_label_cam_ms": round(d, 2),
            "b_over_a": round(b / a, 3), "c_over_a": round(c / a, 3), "d_over_a": round(d / a, 3)}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_memory_child(model_dir: str, image_path: str) -> None:
    """Run in a fresh process: how far the resident set peaks above its level before predicting `image_path`
    (after a warm 600x450 prediction). Writing 5 to clear_refs resets the kernel's peak (VmHWM)."""
    torch.set_num_threads(2)
    predictor = Predictor(model_dir)
    predictor.predict(test_image())
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmRSS")
    predictor.predict(image_path)
    peak = _status_kb("VmHWM")
    print(json.dumps({"added_peak_mb": round((peak - before) / 1024, 1)}))


def bench_large_upload(name: str, folder: Path, repeats: int) -> dict:
    model_dir = str(folder / name)
    predictor = Predictor(model_dir)
    small = test_image((600, 450))
    large_path = folder / "large_8000x6000.jpg"
    large_path.write_bytes(test_image((8000, 6000)))
    small_ms, large_ms = median_ms(lambda: predictor.predict(small), lambda: predictor.predict(str(large_path)),
                                   repeats=max(5, repeats // 2))
    child = subprocess.run([sys.executable, __file__, "--peak-memory-child", model_dir, str(large_path)],
                           capture_output=True, text=True, check=True)
    added = json.loads(child.stdout.strip().splitlines()[-1])["added_peak_mb"]
    return {"backbone": name, "predict_600x450_ms": round(small_ms, 2),
            "predict_8000x6000_jpeg_ms": round(large_ms, 2), "large_over_small": round(large_ms / small_ms, 3),
            "large_added_peak_mb": added}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=list(DEFAULT_BACKBONES) + ["efficientnet_lite0"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--peak-memory-child", nargs=2, metavar=("MODEL_DIR", "IMAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_memory_child:
        peak_memory_child(*args.peak_memory_child)
        return
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.backbones:
            print(json.dumps(bench_backbone(name, folder, args.repeats)), flush=True)
        print(json.dumps(bench_large_upload(args.backbones[0], folder, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
