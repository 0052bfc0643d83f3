"""Class activation maps from the same forward pass as the prediction, computed by pytorch-grad-cam, and overlays.

The registered target layer of every backbone is the last module of timm's `forward_features` (whose output
`forward_intermediates` also returns), so the network splits there: the features are computed once without a
graph, made a leaf that requires grad, and only `forward_head` is differentiated. The CAM arithmetic is
pytorch-grad-cam's own (`get_cam_image`, `scale_cam_image`, `aggregate_multi_layers`), so the map equals what
its GradCAM etc. compute, at a fraction of the cost of a backward pass through the whole network.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM
from pytorch_grad_cam.utils.image import scale_cam_image, show_cam_on_image
from pytorch_grad_cam.metrics.road import ROADCombined
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget

from .models import target_layer
from .posthoc import DEFAULT_CAM_METHOD, PostHocSettings, forward_views, served_call

CAM_METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "hirescam": HiResCAM,
               "layercam": LayerCAM, "eigencam": EigenCAM}


@dataclass(frozen=True)
class Explanation:
    probabilities: np.ndarray   # (num_classes,), sums to 1 (averaged over the test-time views, if any)
    decision: int               # the class called: argmax of the logits plus the model's offsets (if any)
    class_index: int            # the class the CAM explains (default: the decision)
    cam: np.ndarray             # (H, W) in [0, 1], at the model's input resolution
    guard_features: np.ndarray  # (W,) the guard's features of the original view (for the OOD score)


class CamExplainer:
    """Probabilities and a CAM for one preprocessed image, from one forward pass. Thread-safe: it keeps no
    per-call state (no hooks; every call has its own leaf tensor).

    The settings apply as served: with tta_views > 1 the probabilities average the logits of the dihedral
    views (test-time augmentation), computed in the same batched pass, and the CAM explains the original view;
    the temperature scales the logits; the logit offsets of the class-balanced decision move the call, not the
    probabilities."""

    def __init__(self, model: torch.nn.Module, architecture: str, settings: PostHocSettings = PostHocSettings()):
        self.model = model.eval().requires_grad_(False)
        self.layer = target_layer(model, architecture)
        self.settings = settings
        # pytorch-grad-cam objects used for their CAM arithmetic only: their hooks are removed at once
        self._cams = {}
        for name, cls in CAM_METHODS.items():
            cam = cls(model=self.model, target_layers=[self.layer])
            cam.activations_and_grads.release()
            self._cams[name] = cam

    def __call__(self, pixels: torch.Tensor, class_index: int | None = None,
                 method: str = DEFAULT_CAM_METHOD) -> Explanation:
        if method not in self._cams:
            raise ValueError(f"unknown CAM method {method!r}; choose one of {sorted(self._cams)}")
        cam_obj = self._cams[method]
        with torch.no_grad():
            all_features, view_logits, guard_features = forward_views(self.model, pixels[:1],
                                                                      self.settings.tta_views)
        view_logits, guard_features = view_logits[0], guard_features[0].numpy()
        probs, decisions = served_call(self.settings, view_logits.numpy()[None])
        probs, decision = probs[0], int(decisions[0])
        index = decision if class_index is None else int(class_index)
        if not 0 <= index < view_logits.shape[1]:
            raise ValueError(f"class index {index} out of range 0..{view_logits.shape[1] - 1}")
        features = all_features[:1].detach().requires_grad_(cam_obj.uses_gradients)
        targets = [ClassifierOutputTarget(index)]
        grads = None
        if cam_obj.uses_gradients:
            with torch.enable_grad():
                logits = self.model.forward_head(features)
                score = sum(t(o) for t, o in zip(targets, logits))
                grads = torch.autograd.grad(score, features)[0].numpy()
        activations = features.detach().numpy()
        cam = cam_obj.get_cam_image(pixels[:1], self.layer, targets, activations, grads, eigen_smooth=False)
        height, width = pixels.shape[-2:]
        scaled = scale_cam_image(np.maximum(cam, 0), (width, height))
        cam = cam_obj.aggregate_multi_layers([scaled[:, None, :]])[0]
        return Explanation(probabilities=probs, decision=decision, class_index=index, cam=cam,
                           guard_features=guard_features)


def crop_box(image_size: tuple[int, int], data_config: dict) -> tuple[float, float, float, float]:
    """The region (left, top, right, bottom) of an image of `image_size` (w, h) that timm's eval transform
    (resize the shorter side to input/crop_pct, then centre-crop the input size) hands to the model."""
    width, height = image_size
    in_h, in_w = data_config["input_size"][1:]
    crop_pct = data_config.get("crop_pct") or 1.0
    # timm resizes the shorter side to floor(input / crop_pct) (square inputs), keeping the aspect ratio
    scale_size = int(in_h / crop_pct)
    scale = scale_size / min(width, height)
    crop_w, crop_h = in_w / scale, in_h / scale
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    return left, top, left + crop_w, top + crop_h


def project_cam(cam: np.ndarray, image_size: tuple[int, int], data_config: dict) -> tuple[np.ndarray, tuple]:
    """The CAM (at the model's input resolution) resized onto the pixels of the original image that the
    model saw: returns (map of shape (h, w) with 0 outside the crop, the crop box in whole pixels)."""
    width, height = image_size
    left, top, right, bottom = crop_box(image_size, data_config)
    left, top = max(round(left), 0), max(round(top), 0)
    right, bottom = min(round(right), width), min(round(bottom), height)
    heat = cv2.resize(np.float32(cam), (right - left, bottom - top), interpolation=cv2.INTER_LINEAR)
    full = np.zeros((height, width), dtype=np.float32)
    full[top:bottom, left:right] = np.clip(heat, 0, 1)
    return full, (left, top, right, bottom)


def check_opacity(opacity: float) -> None:
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"the overlay opacity must be between 0 and 1, not {opacity}")


def cam_on_image(cam: np.ndarray, image: Image.Image, data_config: dict, opacity: float = 0.5) -> Image.Image:
    """The CAM drawn on the original RGB image at the pixels the model saw; outside that crop the image is
    dimmed and carries no heat map (the model never saw it)."""
    check_opacity(opacity)
    full, (left, top, right, bottom) = project_cam(cam, image.size, data_config)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    out = rgb * 0.55
    out[top:bottom, left:right] = show_cam_on_image(rgb[top:bottom, left:right], full[top:bottom, left:right],
                                                    use_rgb=True, image_weight=1.0 - opacity) / 255.0
    return Image.fromarray(np.uint8(np.round(out * 255)))


def road_faithfulness(explainer: CamExplainer, pixels: torch.Tensor, methods=tuple(CAM_METHODS),
                      percentiles=(20, 40, 60, 80), seed: int = 0) -> dict:
    """ROAD (pytorch-grad-cam's `ROADCombined`: remove-and-debias, least- minus most-relevant first) of each
    CAM method on a batch of preprocessed images, for the top class. Higher is more faithful. The imputation
    adds noise from torch's generator: each method's noise is drawn from `seed`, so the choice is repeatable."""
    metric = ROADCombined(percentiles=list(percentiles))
    scores = {}
    for method in methods:
        explanations = [explainer(pixels[i:i + 1], None, method) for i in range(len(pixels))]
        cams = np.stack([e.cam for e in explanations])
        targets = [ClassifierOutputSoftmaxTarget(e.class_index) for e in explanations]
        with torch.random.fork_rng(devices=[]):  # the imputer draws on the CPU; the caller's state is kept
            torch.default_generator.manual_seed(seed)
            scores[method] = float(np.mean(metric(pixels, cams, targets, explainer.model)))
    best = max(scores, key=scores.get)
    return {"metric": f"ROADCombined(percentiles={list(percentiles)}) on softmax, top class",
            "images": int(len(pixels)), "scores": scores, "best_method": best}
