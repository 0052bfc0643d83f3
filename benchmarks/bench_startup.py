"""How long `python app.py` takes from launch to its first answer when the Hub cannot be had, measured in one run:

    (a) HF_HUB_OFFLINE=1 (no request is made: the bundled model is served),
    (b) the network unreachable (HF_ENDPOINT points at a port nobody listens on),
each launched `--runs` times alternately with an empty HF_HOME; the first answer is a gradio_client predict on
one of the bundled model's examples. Prints one JSON line: medians in seconds and b / a. Target: <= 1.2.

    python benchmarks/bench_startup.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gradio_client import Client, handle_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from app import BUNDLED_MODEL  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_to_answer(env: dict, image: Path) -> float:
    """Seconds from starting `python app.py` to the first prediction it returns."""
    port = free_port()
    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--port", str(port)], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"app.py exited with {server.returncode}")
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:  # not listening yet
                time.sleep(0.1)
        client.predict(handle_file(str(image)), api_name="/predict")
        return time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="launches per condition")
    args = parser.parse_args()
    image = BUNDLED_MODEL / json.loads((BUNDLED_MODEL / "examples.json").read_text())[0]["file"]
    base = {k: v for k, v in os.environ.items() if k not in ("DERMADETECT_MODEL", "HF_ENDPOINT", "HF_HUB_OFFLINE")}
    times = {"offline": [], "unreachable": []}
    with tempfile.TemporaryDirectory() as home:
        conditions = {"offline": {**base, "HF_HOME": home, "HF_HUB_OFFLINE": "1"},
                      "unreachable": {**base, "HF_HOME": home, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}}
        for _ in range(args.runs):
            for name, env in conditions.items():
                times[name].append(launch_to_answer(env, image))
    medians = {name: round(statistics.median(t), 2) for name, t in times.items()}
    print(json.dumps({"runs": args.runs, "offline_s": medians["offline"], "unreachable_s": medians["unreachable"],
                      "ratio_unreachable_over_offline": round(medians["unreachable"] / medians["offline"], 3),
                      "target": 1.2}))


if __name__ == "__main__":
    main()
