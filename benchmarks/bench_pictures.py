"""The served guard on everyday pictures it was never fitted on: photographs, wallpapers and abstract art, and cut-out
animals, food, objects and symbols (photographs and drawings on a transparent background), all from Debian's artwork
packages. Each file goes through the served path as an upload (Predictor.predict on the file); per package (and per
top folder of the cut-outs), one JSON line with the share flagged "not dermoscopy", its 95% Wilson interval, the
files that pass and the files the upload checks refuse (too small), then one line for all of them.

    apt-get install tuxpaint-stamps-default mate-backgrounds ukui-wallpapers lomiri-wallpapers \\
        plasma-workspace-wallpapers
    python benchmarks/bench_pictures.py [--model MODEL_DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from app import BUNDLED_MODEL  # noqa: E402
from dermadetect.inference import InvalidImageError, Predictor  # noqa: E402

PACKAGES = ("mate-backgrounds", "ukui-wallpapers", "lomiri-wallpapers", "plasma-workspace-wallpapers",
            "tuxpaint-stamps-default")
IMAGE = re.compile(r"\.(jpe?g|png|webp)$", re.IGNORECASE)
STAMPS = Path("/usr/share/tuxpaint/stamps")
PLASMA_SIZE = re.compile(r"/wallpapers/([^/]+)/contents/images(?:_dark)?/(\d+)x(\d+)\.\w+$")


def package_files(package: str) -> list[Path]:
    """The package's image files, as dpkg lists them; a clear error when it is not installed."""
    try:
        listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
    except FileNotFoundError:
        raise SystemExit("the pictures come from Debian packages, and this system has no dpkg") from None
    if listing.returncode != 0:
        raise SystemExit(f"{package} is not installed: apt-get install {' '.join(PACKAGES)}")
    return sorted(Path(line) for line in listing.stdout.splitlines() if IMAGE.search(line) and Path(line).is_file())


def picture_sets() -> dict[str, list[Path]]:
    """Per set, its pictures, each once: of Plasma's wallpapers (many sizes and a thumbnail each) the largest,
    of Tux Paint's stamps (one set per top folder) not the mirrored copies."""
    sets = defaultdict(list)
    for package in PACKAGES:
        files = package_files(package)
        if package == "plasma-workspace-wallpapers":
            largest = {}
            for match in filter(None, (PLASMA_SIZE.search(str(file)) for file in files)):  # not the thumbnails
                name, width, height = match.groups()
                largest[name] = max(largest.get(name, (0, None)), (int(width) * int(height), Path(match.string)))
            files = [file for _, file in sorted(largest.values())]
        if package == "tuxpaint-stamps-default":
            for file in files:
                if not file.stem.endswith("_mirror"):
                    sets[f"{package}/{file.relative_to(STAMPS).parts[0]}"].append(file)
        else:
            sets[package] = files
    return dict(sets)


def wilson(flagged: int, total: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion (sound near 0 and 1, where these shares are)."""
    share = flagged / total
    centre = (share + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def row(name: str, flags: dict[Path, bool], refused: list[str]) -> dict:
    flagged = sum(flags.values())
    return {"set": name, "pictures": len(flags), "flagged": flagged,
            "flagged_share": round(flagged / len(flags), 4) if flags else None,
            "interval95": wilson(flagged, len(flags)) if flags else None,
            "passed": [str(file) for file, flag in flags.items() if not flag], "refused": refused}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(BUNDLED_MODEL), help="model folder (default: the bundled model)")
    parser.add_argument("--out", type=Path, help="also write the lines as JSON here")
    args = parser.parse_args(argv)
    predictor = Predictor(args.model)
    if predictor.ood is None:
        raise SystemExit(f"{args.model} has no dermoscopy guard (ood.safetensors)")
    rows, every, every_refused = [], {}, []
    for name, files in picture_sets().items():
        flags, refused = {}, []
        for file in files:
            try:
                flags[file] = predictor.predict(file).out_of_distribution
            except InvalidImageError as error:
                refused.append(f"{file}: {error}")
        rows.append(row(name, flags, refused))
        every.update(flags)
        every_refused += refused
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "refused"} | {"refused": len(refused)}),
              flush=True)
    # the threshold ties the file to the guard it measured (tests/test_results.py)
    model = Path(args.model).resolve()
    rows.append(row("all", every, every_refused) | {"model": str(model.relative_to(REPO)) if model.is_relative_to(REPO)
                                                    else args.model, "threshold": predictor.ood.threshold})
    print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("passed", "refused")}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
