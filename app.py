"""DermaDetect demo (Hugging Face Space and `python app.py`): label chart and Grad-CAM side by side.

Model source: --model or DERMADETECT_MODEL (hf-hub:ORG/NAME[@REV] or a local folder); the default is the
published ConvNeXtV2 on the Hub, and when that is not published or cannot be reached (one request, no retries)
the bundled model in models/ is served at once, with a notice on the page that says which.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import tempfile
import time
import warnings
from pathlib import Path

import gradio as gr
from huggingface_hub import ModelCard
from huggingface_hub import constants as hub_constants
from PIL import Image

from dermadetect.explain import CAM_METHODS
from dermadetect.hub import HubRepoMissing, HubUnreachable, ModelSourceError, example_images
from dermadetect.inference import InvalidImageError, Prediction, Predictor
from dermadetect.labels import CLASS_NOTES, DISCLAIMER, MALIGNANT, readable_name
from dermadetect.posthoc import MELANOMA_TARGET_SENSITIVITY

logger = logging.getLogger("dermadetect.app")
# Gradio's queue sets pandas options that pandas 3 deprecates, once per request; nothing here can change that
warnings.filterwarnings("ignore", module="gradio.queueing")

HUB_MODEL = "hf-hub:dermadetect/dermadetect-convnextv2_nano"
# `python -m dermadetect publish --bundle` keeps exactly one model here
BUNDLED_MODEL = min((Path(__file__).resolve().parent / "models").glob("dermadetect-*"))
TOP_CLASS = "Top class"
LOW_CONFIDENCE = 0.5          # top probability under this is flagged
HIGH_ENTROPY = 0.75           # entropy / log(num_classes) over this is flagged
MAX_UPLOAD_MB = 20          # larger uploads are refused in the browser, before they are sent
OVERLAY_DIR = Path(tempfile.gettempdir()) / "dermadetect-overlays"
CAM_LEGEND = ("Colour: blue, little influence on the explained class -> red, most influence. The model sees only the "
              "central square of the image; the dimmed border is outside it.")
# phones: the chart above the overlay, each the full width (desktop keeps them side by side)
CSS = """
@media (max-width: 600px) {
  #results { flex-direction: column !important; }
  #results > * { width: 100% !important; min-width: 100% !important; }
}
"""


class UploadPath(gr.Image):
    """An image input that hands the handler the uploaded file untouched: Gradio's own preprocessing opens
    it with PIL first, which turns a text file or a decompression bomb into a bare error before the
    Predictor can say what is wrong."""

    is_template = True  # Gradio's mechanism for subclasses: render with the parent's (gr.Image) frontend

    def preprocess(self, payload):
        if payload is None or (payload.url and payload.url.startswith("data:")) or payload.path is None:
            return super().preprocess(payload)  # webcam and clipboard captures arrive as data URLs
        return str(payload.path)


def load_predictor(source: str | None) -> tuple[Predictor, str]:
    """The requested model, or the bundled one when the default Hub model cannot be had, with a notice that
    says why (not published yet, or the Hub out of reach and the model not cached)."""
    requested = source or os.environ.get("DERMADETECT_MODEL")
    if requested:
        return Predictor(requested), ""  # the user asked for this model: an error, not a silent swap
    try:
        return Predictor(HUB_MODEL), ""
    except ModelSourceError as exc:
        logger.warning("default model unavailable (%s); serving the bundled model", exc)
        published = f"The published model ({HUB_MODEL[len('hf-hub:'):]})"
        if isinstance(exc, HubRepoMissing):
            why = f"{published} is not on the Hub yet"
        elif isinstance(exc, HubUnreachable):
            hub = "is switched off here (HF_HUB_OFFLINE=1)" if hub_constants.HF_HUB_OFFLINE else "could not be reached"
            why = f"{published} is not cached here and the Hugging Face Hub {hub}"
        else:
            why = f"{published} could not be loaded ({exc})"
        return Predictor(str(BUNDLED_MODEL)), f"{why}, so this page serves the bundled model instead."


def model_name(predictor: Predictor) -> str:
    """The Hub id and commit, or "bundled: NAME", or a local folder's name: never a path of this machine."""
    loaded = predictor.loaded
    if loaded.source.startswith("hf-hub:"):
        return loaded.source[len("hf-hub:"):]
    if loaded.folder.resolve() == BUNDLED_MODEL:
        return f"bundled: {BUNDLED_MODEL.name}"
    return f"local: {loaded.folder.name}"


def model_summary(predictor: Predictor) -> str:
    """Which model this page serves and how it scored on the held-out test set as served here (the call, the
    melanoma flag, calibrated probabilities, with 95% intervals), from the analysis it ships with; the network
    alone comes second, from its card."""
    loaded = predictor.loaded
    lines = [f"**Model:** `{model_name(predictor)}` (backbone `{loaded.architecture}`, "
             f"{len(predictor.label_names)} classes, input {predictor.data_config['input_size'][1]} px)"]
    analysis = loaded.folder / "analysis.json"
    if analysis.is_file():
        a = json.loads(analysis.read_text())
        ci = a["bootstrap"]["test"]

        def interval(key: str) -> str:
            return f"{ci[key]['value']:.3f} (95% CI {ci[key]['low']:.3f}-{ci[key]['high']:.3f})"

        served = f"balanced accuracy {interval('balanced_accuracy')}"
        if "melanoma_sensitivity_at_threshold" in ci:
            mel = a["melanoma_operating_point"]["test"]
            served += (f"; melanoma flag: sensitivity {interval('melanoma_sensitivity_at_threshold')}, "
                       f"specificity {mel['specificity']:.3f}")
        served += f"; calibration error (ECE) {a['calibration']['test']['after']['ece']:.3f}"
        lines.append(f"**On held-out test images, as this page serves it:** {served}.")
    card = loaded.folder / "README.md"
    if card.is_file():
        results = ModelCard.load(card).data.eval_results or []
        if results:
            shown = ", ".join(f"{r.metric_name or r.metric_type} {r.metric_value:.3f}" for r in results)
            label = "The network alone (one view, plain argmax)" if analysis.is_file() else "Test metrics"
            lines.append(f"{label}, {results[0].dataset_name}: {shown}.")
    return "  \n".join(lines)


def find_examples(predictor: Predictor) -> list[list[str]]:
    """The model folder's example images (hub.example_images), as Gradio's examples."""
    return [[str(path)] for path in example_images(predictor.loaded.folder)]


def summary_line(result: Prediction, label_names, withheld: bool = True) -> str:
    """Plain words, never a diagnosis: where the probability mass sits, and whether to trust it. For a picture
    the guard flags, the scores are withheld (or, once the visitor asks for them, marked unreliable)."""
    probabilities = result.probabilities
    call, top = result.top_label, max(probabilities, key=probabilities.get)
    malignant = sum(p for name, p in probabilities.items() if name in MALIGNANT)
    entropy = -sum(p * math.log(p) for p in probabilities.values() if p > 0) / math.log(len(label_names))
    text = ""
    if result.out_of_distribution:
        if withheld:
            return ("⚠️ **This does not look like a dermoscopy image**, so its scores are withheld: the model has "
                    "only seen dermoscopy images, and its scores mean nothing for other pictures. A dermoscopy image "
                    "is taken through a dermatoscope (a magnifier with its own light, held on the skin) and shows one "
                    "lesion filling most of the frame; ordinary phone photos of skin are not dermoscopy. Upload one, "
                    "or show the scores anyway knowing they are unreliable. This is not a diagnosis.")
        text = ("⚠️ **This does not look like a dermoscopy image**: the scores below mean nothing for it and are "
                "shown only because you asked.\n\n")
    text += f"The model's call is **{readable_name(call)}** ({probabilities[call]:.0%}). "
    if call != top:
        text += (f"Its highest probability is {readable_name(top)} ({probabilities[top]:.0%}): the call weighs the "
                 f"rarer classes up, by as much as recognised all {len(label_names)} classes most evenly on "
                 "validation data (balanced accuracy). ")
    text += (f"{malignant:.0%} of the probability falls on classes that include skin cancers "
             f"({', '.join(n for n in label_names if n in MALIGNANT)}). This is not a diagnosis.")
    if result.melanoma_flag and not result.out_of_distribution:
        text += ("\n\n🔎 **Melanoma score above the study's screening threshold** (chosen on validation data to catch "
                 f"{MELANOMA_TARGET_SENSITIVITY:.0%} of melanomas, at the price of many false alarms). Only a clinician who examines the lesion "
                 "can tell what it is.")
    if probabilities[top] < LOW_CONFIDENCE or entropy > HIGH_ENTROPY:
        text += ("\n\n⚠️ **Low confidence:** the scores are spread over several classes. The image may be unclear, "
                 "not a dermoscopy image, or unlike anything the model was trained on.")
    return text


def save_overlay(image: Image.Image) -> str:
    """The overlay as a JPEG file named by its content, written atomically. Handing Gradio a PIL image instead
    lets concurrent requests with identical output rewrite one cache file while another is being served
    (gradio.processing_utils.save_pil_to_cache), and the reader gets a truncated file; Gradio copies a
    returned file with an atomic rename. Files older than an hour are removed."""
    data = io.BytesIO()
    image.save(data, format="JPEG", quality=90)
    payload = data.getvalue()
    OVERLAY_DIR.mkdir(parents=True, exist_ok=True)
    cutoff = time.time() - 3600
    for old in OVERLAY_DIR.glob("*.jpg"):
        with contextlib.suppress(FileNotFoundError):  # another request may prune it first
            if old.stat().st_mtime < cutoff:
                old.unlink()
    path = OVERLAY_DIR / f"{hashlib.sha256(payload).hexdigest()[:32]}.jpg"
    try:
        os.utime(path)  # handed out again: it must outlive this request, not its first one
    except FileNotFoundError:
        fd, staging = tempfile.mkstemp(dir=OVERLAY_DIR, suffix=".part")
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(staging, path)
    return str(path)


def make_handler(predictor: Predictor):
    """The predict event: upload path and controls in; label dict, overlay and summary out (the API), plus
    for the page whether the scores are withheld and the CAM for re-blending."""
    labels = list(predictor.label_names)

    def predict(image_path, cam_method=None, explain_class=TOP_CLASS, opacity=0.5):
        if image_path is None:
            # also what follows a refused upload (too large), so the limit is named
            raise gr.Error(f"No image to analyse: upload a dermoscopy image of at most {MAX_UPLOAD_MB} MB first.")
        explain = None if explain_class in (None, TOP_CLASS) else explain_class
        try:
            result = predictor.predict(image_path, explain=explain, method=cam_method, opacity=float(opacity))
        except (InvalidImageError, ValueError) as exc:  # ValueError: an unknown class or CAM method
            message = str(exc)
            raise gr.Error(message[:1].upper() + message[1:]) from None
        return (result.readable, save_overlay(result.overlay), summary_line(result, labels),
                result.out_of_distribution, (image_path, result.cam, summary_line(result, labels, withheld=False)))

    return predict


def glossary(predictor: Predictor) -> str:
    """The classes in plain words, which include cancers, and their share of the training images; what the tool
    can and cannot do, and what to do next."""
    analysis = predictor.loaded.folder / "analysis.json"
    shares = json.loads(analysis.read_text())["decision"]["class_prior"] if analysis.is_file() else {}
    rows = "\n".join(f"| {readable_name(n)} | {'malignant' if n in MALIGNANT else 'benign'} | "
                     f"{CLASS_NOTES.get(n, '')} | {f'{shares[n]:.0%}' if n in shares else 'n/a'} |"
                     for n in predictor.label_names)
    return f"""| class | kind | what it is | share of training images |
| --- | --- | --- | --- |
{rows}

**What it can do:** sort a dermoscopy image of one pigmented lesion into these {len(predictor.label_names)} classes
and show where it looked. **What it cannot do:** diagnose; judge ordinary photos, other skin conditions or
skin types the training data lacks. **What to do next:** whatever the scores, see a doctor or dermatologist
about any lesion that worries you, changes, bleeds or itches. Uploads are not kept: files leave the server
within an hour."""


def build_demo(predictor: Predictor, notice: str = "") -> gr.Blocks:
    labels = list(predictor.label_names)
    handler = make_handler(predictor)
    # delete_cache: uploads and outputs older than an hour leave the server (these are medical images)
    with gr.Blocks(title="DermaDetect", delete_cache=(600, 3600)) as demo:
        gr.Markdown("# DermaDetect\nExplainable skin-lesion classification of dermoscopy images.")
        gr.Markdown(f"⚠️ **{DISCLAIMER}**", elem_id="disclaimer")
        if notice:
            gr.Markdown(f"ℹ️ {notice}", elem_id="fallback-notice")
        gr.Markdown(model_summary(predictor), elem_id="model-info")
        # per visitor: whether the guard withheld the scores, and (analysed upload, its CAM, the summary to show
        # if asked); kept an hour at most, like the uploads
        withheld, analysed = gr.State(False, time_to_live=3600), gr.State(None, time_to_live=3600)
        with gr.Row():
            with gr.Column(scale=1):
                image = UploadPath(type="filepath", image_mode=None, sources=["upload", "webcam", "clipboard"],
                                   label="Dermoscopy image", elem_id="upload")
                with gr.Accordion("Explanation settings", open=False):
                    cam_method = gr.Dropdown(sorted(CAM_METHODS), value=predictor.default_method,
                                             label="CAM method", elem_id="cam-method")
                    explain_class = gr.Dropdown([TOP_CLASS] + [(readable_name(n), n) for n in labels],
                                                value=TOP_CLASS, label="Class to explain", elem_id="explain-class")
                    opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity", elem_id="opacity")
                button = gr.Button("Analyse", variant="primary", elem_id="analyse")
                examples = find_examples(predictor)
                if examples:
                    gr.Examples(examples, inputs=[image], label="Examples: test images the model never saw, one per class")
            with gr.Column(scale=2):
                with gr.Row(elem_id="results"):
                    # no heading: the chart shows probabilities, and the model's call (which may weigh rare
                    # classes up) is stated in the summary
                    chart = gr.Label(num_top_classes=len(labels), label="Class probabilities", show_heading=False,
                                     elem_id="labels")
                    with gr.Column(elem_id="overlay-box") as overlay_box:
                        overlay = gr.Image(type="filepath", label="Where the model looked (CAM)",
                                           interactive=False, elem_id="overlay")
                        gr.Markdown(CAM_LEGEND, elem_id="cam-legend")
                summary = gr.Markdown(label="Summary", elem_id="summary")
                show_anyway = gr.Button("Show the scores anyway", visible=False, elem_id="show-anyway")
        with gr.Accordion(f"The {len(predictor.label_names)} classes, and what this tool can and cannot do",
                          open=False, elem_id="glossary"):
            gr.Markdown(glossary(predictor))

        outputs = [chart, overlay, summary, withheld, analysed]

        def withhold(hidden: bool):  # the scores of a picture that is not dermoscopy stay hidden until asked
            return gr.update(visible=not hidden), gr.update(visible=not hidden), gr.update(visible=hidden)

        button.click(handler, inputs=[image, cam_method, explain_class, opacity], outputs=outputs,
                     api_name="predict").then(withhold, inputs=withheld, outputs=[chart, overlay_box, show_anyway],
                                              api_visibility="private")
        show_anyway.click(lambda state: (gr.update(visible=True), gr.update(visible=True), gr.update(visible=False),
                                         state[2]),
                          inputs=analysed, outputs=[chart, overlay_box, show_anyway, summary], api_visibility="private")

        # a new class or method explains the analysed image again at once (not a newer upload not yet analysed)
        def rerun(state, method, explain, value):
            return gr.skip() if state is None else handler(state[0], method, explain, value)

        for control in (cam_method, explain_class):
            control.change(rerun, inputs=[analysed, cam_method, explain_class, opacity], outputs=outputs,
                           api_visibility="private").then(withhold, inputs=withheld,
                                                          outputs=[chart, overlay_box, show_anyway],
                                                          api_visibility="private")

        def reblend(state, value):  # a new opacity re-blends the cached CAM: no model call
            if state is None:
                return gr.skip()
            try:
                return save_overlay(predictor.overlay(state[0], state[1], float(value)))
            except InvalidImageError as exc:  # the upload left the server's cache meanwhile
                raise gr.Error(f"Analyse the image again: {exc}") from None

        opacity.release(reblend, inputs=[analysed, opacity], outputs=overlay, api_visibility="private")
    demo.queue(max_size=16, default_concurrency_limit=2)
    return demo


def launch(demo: gr.Blocks, **options):
    """Launch with the page's style and upload limit (app.py, the tests and the benchmarks)."""
    return demo.launch(ssr_mode=False, max_file_size=f"{MAX_UPLOAD_MB}mb", css=CSS, **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=DISCLAIMER)
    parser.add_argument("--model", help="hf-hub:ORG/NAME[@REV] or a local model folder "
                                        "(default: $DERMADETECT_MODEL, else the published ConvNeXtV2)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    try:
        predictor, notice = load_predictor(args.model)
    except ModelSourceError as exc:
        parser.exit(2, f"error: {exc}\n")
    launch(build_demo(predictor, notice), server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
