"""What the demo adds on top of the model and Gradio's own round trip, measured in one run on one image.

    (a) the bare model forward (torch.inference_mode, preprocessed tensor),
    (b) the Predictor's label + CAM + overlay on the upload (Predictor.predict on the file),
    (c) a do-nothing Gradio app with the same input and output components that returns its input,
    (d) the real app's predict,
    (e) an opacity change: the page re-blends the cached CAM on the upload (Predictor.overlay), no model call,
(c) and (d) through gradio_client against local launches. Prints one JSON line: medians and p95 in ms,
d / (b + c) (target: <= 1.2) and e / b (target: <= 0.33).

    python benchmarks/bench_app.py [--model MODEL_DIR] [--image IMAGE] [--calls 30]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import gradio as gr
import numpy as np
import timm
import torch
from gradio_client import Client, handle_file
from PIL import Image
from timm.data import resolve_model_data_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import app  # noqa: E402
from dermadetect.hub import export_for_hub  # noqa: E402
from dermadetect.posthoc import PostHocSettings  # noqa: E402
from dermadetect.inference import Predictor, open_image  # noqa: E402
from dermadetect.labels import HAM10000_CLASSES, readable_name  # noqa: E402


def stats(times_ms: list[float]) -> dict:
    return {"median_ms": round(statistics.median(times_ms), 1),
            "p95_ms": round(float(np.percentile(times_ms, 95)), 1)}


def timed(fn, calls: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def echo_demo(labels) -> gr.Blocks:
    """The real app's components, with a handler that does no work."""
    fixed = {readable_name(n): 1.0 / len(labels) for n in labels}
    with gr.Blocks() as demo:
        image = app.UploadPath(type="filepath", image_mode=None)
        method = gr.Dropdown(["gradcam"], value="gradcam")
        explain = gr.Dropdown([app.TOP_CLASS] + list(labels), value=app.TOP_CLASS)
        opacity = gr.Slider(0.0, 1.0, value=0.5)
        chart, overlay, summary = gr.Label(), gr.Image(type="filepath"), gr.Markdown()
        gr.Button().click(lambda path, *_: (fixed, path, "echo"), inputs=[image, method, explain, opacity],
                          outputs=[chart, overlay, summary], api_name="predict")
    demo.queue(max_size=16, default_concurrency_limit=2)
    return demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: a random-weight convnextv2_nano at 224 px)")
    parser.add_argument("--image", help="a 600x450 JPEG (default: ham10000-originals from DERMADETECT_DATA)")
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp())
    model_dir = args.model
    if model_dir is None:
        torch.manual_seed(0)
        model = timm.create_model("convnextv2_nano", num_classes=7)
        model_dir = str(export_for_hub(model, "convnextv2_nano", HAM10000_CLASSES, resolve_model_data_config(model),
                                       tmp / "model", PostHocSettings()))
    image_path = args.image
    if image_path is None:
        data = os.environ.get("DERMADETECT_DATA")
        if not data:
            raise SystemExit("pass --image or set DERMADETECT_DATA")
        image_path = str(sorted((Path(data) / "ham10000-originals").glob("*.jpg"))[0])
    with Image.open(image_path) as im:
        size = im.size

    predictor = Predictor(model_dir)
    pixels = predictor.preprocess(open_image(image_path))
    with torch.inference_mode():
        bare = timed(lambda: predictor.loaded.model(pixels), args.calls)
    label_cam = timed(lambda: predictor.predict(image_path), args.calls)
    cam = predictor.predict(image_path).cam
    reblend = timed(lambda: predictor.overlay(image_path, cam, 0.3), args.calls)

    servers = {}
    for name, demo in (("echo", echo_demo(predictor.label_names)), ("app", app.build_demo(predictor))):
        port = free_port()
        app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        servers[name] = (demo, Client(f"http://127.0.0.1:{port}/", verbose=False))
    upload = handle_file(image_path)
    echo = timed(lambda: servers["echo"][1].predict(upload, api_name="/predict"), args.calls)
    real = timed(lambda: servers["app"][1].predict(upload, api_name="/predict"), args.calls)
    for demo, _ in servers.values():
        demo.close()

    a, b, c, d, e = stats(bare), stats(label_cam), stats(echo), stats(real), stats(reblend)
    print(json.dumps({"image": Path(image_path).name, "image_size": list(size), "model": predictor.loaded.architecture,
                      "input": list(pixels.shape), "calls": args.calls, "a_bare_forward": a,
                      "b_predictor_label_cam": b, "c_gradio_echo": c, "d_app_predict": d,
                      "e_opacity_reblend": e,
                      "d_over_b_plus_c": round(d["median_ms"] / (b["median_ms"] + c["median_ms"]), 3),
                      "e_over_b": round(e["median_ms"] / b["median_ms"], 3)}))


if __name__ == "__main__":
    main()
