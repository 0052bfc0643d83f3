"""Command line: `python -m dermadetect predict IMAGE... --model SRC [--cam-method M] [--class LABEL] [--out DIR]`.

Prints one JSON line per image: the probabilities and top class, or the readable error."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .explain import CAM_METHODS
from .inference import InvalidImageError, Predictor
from .labels import DISCLAIMER


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dermadetect", epilog=DISCLAIMER)
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser("predict", help="classify images and write Grad-CAM overlays")
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--model", required=True, help="model folder or hf-hub:ORG/NAME[@REVISION]")
    predict.add_argument("--cam-method", choices=sorted(CAM_METHODS), help="default: the model's own")
    predict.add_argument("--class", dest="explain", help="label to explain (default: the top class)")
    predict.add_argument("--out", help="folder for the overlays (<image stem>_cam.png)")
    args = parser.parse_args(argv)

    predictor = Predictor(args.model)
    if args.explain and args.explain not in predictor.label_names:
        parser.error(f"--class {args.explain!r} is not one of {list(predictor.label_names)}")
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for path in args.images:
        try:
            result = predictor.predict(path, explain=args.explain, method=args.cam_method)
        except InvalidImageError as exc:
            failures += 1
            print(json.dumps({"image": path, "error": str(exc), "error_type": type(exc).__name__}), flush=True)
            continue
        record = {"image": path, "top_class": result.top_label, "explained_class": result.explained_label,
                  "probabilities": result.probabilities, "cam_method": args.cam_method or predictor.default_method}
        if out:
            overlay = out / f"{Path(path).stem}_cam.png"
            result.overlay.save(overlay)
            record["overlay"] = str(overlay)
        print(json.dumps(record), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
