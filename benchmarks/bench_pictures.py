"""The served guard on everyday pictures it was never fitted on: wallpapers (photographs and abstract art, whole
frame) and cut-out animals, food, objects and symbols (photographs and drawings on a transparent background), all
from Debian's artwork packages. Each picture goes through the served path as an upload (Predictor.predict on the
file); per package (Tux Paint's stamps per top folder), one JSON line with the share flagged "not dermoscopy", its
95% Wilson interval, the files that pass and those the upload checks refuse (too small); then one line per kind
(wallpapers, cut-outs) and one for all.

    apt-get install tuxpaint-stamps-default mate-backgrounds ukui-wallpapers lomiri-wallpapers-16.04 \\
        lomiri-wallpapers-20.04 plasma-workspace-wallpapers
    python benchmarks/bench_pictures.py [--model MODEL_DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from PIL import Image
from scipy.stats import binomtest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from app import BUNDLED_MODEL  # noqa: E402
from dermadetect.inference import InvalidImageError, Predictor  # noqa: E402

PACKAGES = ("mate-backgrounds", "ukui-wallpapers", "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04",
            "plasma-workspace-wallpapers", "tuxpaint-stamps-default")
# what a picture is like: the wallpapers fill the frame, the stamps stand on a transparent background
KINDS = {"wallpapers": PACKAGES[:-1], "cut-outs": PACKAGES[-1:]}
IMAGE = re.compile(r"\.(jpe?g|png|webp)$", re.IGNORECASE)
STAMPS = Path("/usr/share/tuxpaint/stamps")
# one picture in several sizes: "Elephants_3840x2160.jpg" beside "Elephants.jpg", Plasma's "images/1920x1080.jpg"
SIZE_SUFFIX = re.compile(r"_?\d+x\d+$")


def package_files(package: str) -> list[Path]:
    """The package's image files, as dpkg lists them; a clear error when it is not installed."""
    try:
        listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
    except FileNotFoundError:
        raise SystemExit("the pictures come from Debian packages and this system has no dpkg: run the benchmark "
                         "on Debian or Ubuntu (a debian container will do)") from None
    if listing.returncode != 0:
        raise SystemExit(f"{package} is not installed ({listing.stderr.strip()}): apt-get install "
                         f"{' '.join(PACKAGES)}")
    return sorted(Path(line) for line in listing.stdout.splitlines() if IMAGE.search(line) and Path(line).is_file())


def distinct_pictures(files: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """(package, file) for each picture once: links and identical files once, of one picture's sizes the largest,
    no preview thumbnails (Plasma's screenshot.*) and no mirrored copies (Tux Paint's *_mirror)."""
    largest, seen = {}, set()
    for package, link in files:
        file = link.resolve()
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        if file.stem == "screenshot" or file.stem.endswith("_mirror") or digest in seen:
            continue
        seen.add(digest)
        with Image.open(file) as image:
            pixels = image.width * image.height
        key = (file.parent, SIZE_SUFFIX.sub("", file.stem))
        largest[key] = max(largest.get(key, (0, package, file)), (pixels, package, file))
    return [(package, file) for _, package, file in largest.values()]


def picture_sets() -> dict[str, list[Path]]:
    """Per package its pictures; Tux Paint's stamps per top folder."""
    sets = defaultdict(list)
    files = [(package, file) for package in PACKAGES for file in package_files(package)]
    for package, file in distinct_pictures(files):
        name = f"{package}/{file.relative_to(STAMPS).parts[0]}" if file.is_relative_to(STAMPS) else package
        sets[name].append(file)
    return {name: sorted(sets[name]) for name in sorted(sets, key=lambda n: (PACKAGES.index(n.split("/")[0]), n))}


def row(name: str, flags: dict[Path, bool], refused: list[str]) -> dict:
    flagged = sum(flags.values())
    interval = binomtest(flagged, len(flags)).proportion_ci(method="wilson") if flags else None
    return {"set": name, "pictures": len(flags), "flagged": flagged,
            "flagged_share": round(flagged / len(flags), 4) if flags else None,
            "interval95": [round(float(interval.low), 4), round(float(interval.high), 4)] if flags else None,
            "passed": [str(file) for file, flag in flags.items() if not flag], "refused": refused}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(BUNDLED_MODEL), help="model folder (default: the bundled model)")
    parser.add_argument("--out", type=Path, help="also write the lines as JSON here")
    args = parser.parse_args(argv)
    predictor = Predictor(args.model)
    if predictor.ood is None:
        raise SystemExit(f"{args.model} has no dermoscopy guard (ood.safetensors): run `python -m dermadetect "
                         "analyze RUN` and `python -m dermadetect export RUN` on its run first")
    rows, scored = [], {}
    for name, files in picture_sets().items():
        flags, refused = {}, []
        for file in files:
            try:
                flags[file] = predictor.predict(file).out_of_distribution
            except InvalidImageError as error:
                refused.append(f"{file}: {error}")
        scored[name] = flags, refused
        rows.append(row(name, flags, refused))
        print(json.dumps(rows[-1]), flush=True)

    def pooled(names) -> tuple[dict[Path, bool], list[str]]:
        return ({file: flag for name in names for file, flag in scored[name][0].items()},
                [reason for name in names for reason in scored[name][1]])

    for kind, packages in KINDS.items():
        rows.append(row(f"kind: {kind}", *pooled([name for name in scored if name.split("/")[0] in packages])))
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("passed", "refused")}), flush=True)
    model = Path(args.model).resolve()
    model_name = str(model.relative_to(REPO)) if model.is_relative_to(REPO) else args.model
    # the threshold ties the file to the guard it measured: the card states it only for that guard
    rows.append(row("all", *pooled(scored)) | {"model": model_name, "threshold": predictor.ood.threshold})
    print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("passed", "refused")}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
