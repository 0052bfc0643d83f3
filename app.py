"""DermaDetect demo (Gradio Space). The label chart and Grad-CAM view arrive with the Predictor; until then
the page says plainly that no model is served."""

from __future__ import annotations

import gradio as gr

from dermadetect.labels import DISCLAIMER


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="DermaDetect") as demo:
        gr.Markdown("# DermaDetect\nExplainable skin-lesion classification (HAM10000, 7 classes).")
        gr.Markdown(f"**{DISCLAIMER}**")
        gr.Markdown("No model is served by this build yet: train one with `python train.py` (see README.md).")
    return demo


if __name__ == "__main__":
    build_demo().launch(ssr_mode=False)
