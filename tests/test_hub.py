"""Model cards, push and pull: the real huggingface_hub client against a local server that speaks the Hub's
download protocol, and at the HfApi boundary for uploads."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from dermadetect.config import DEFAULT_BACKBONES
from dermadetect.hub import CARD_METRICS
from dermadetect.pipeline import push_run
from dermadetect.report import read_backbone_row, write_comparison

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def front_matter(card_text: str) -> dict:
    assert card_text.startswith("---\n")
    return yaml.safe_load(card_text.split("---\n", 2)[1])


def test_card_front_matter_and_numbers_come_from_metrics(smoke_run):
    for backbone in DEFAULT_BACKBONES:
        text = (smoke_run / backbone / "export" / "README.md").read_text()
        meta = front_matter(text)
        assert meta["license"] == "cc-by-nc-4.0" and meta["library_name"] == "timm"
        assert meta["pipeline_tag"] == "image-classification"
        assert {"dermatology", "medical", "skin-lesion"} <= set(meta["tags"])
        assert "base_model" not in meta  # random init: no ImageNet checkpoint to name
        metrics = json.loads((smoke_run / backbone / "metrics.json").read_text())
        reported = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
        assert reported == {key: metrics["test"][key] for key, _ in CARD_METRICS}
        assert f"{metrics['test']['balanced_accuracy']:.3f}" in text
        assert "never diagnoses" in text and "Out-of-scope use" in text and "CC BY-NC 4.0" in text
        examples = json.loads((smoke_run / backbone / "export" / "examples.json").read_text())
        assert sorted(e["label"] for e in examples) == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
        assert all((smoke_run / backbone / "export" / e["file"]).is_file() for e in examples)


class FakeHub(BaseHTTPRequestHandler):
    """/{repo}/resolve/{revision}/{file}, with the headers huggingface_hub reads (X-Repo-Commit, ETag,
    Content-Length) and its error codes (X-Error-Code)."""
    repos: dict = {}

    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def answer(self, body: bool):
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self.fail(404, "RepoNotFound")
        repo, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        if repo not in self.repos:
            return self.fail(404, "RepoNotFound")
        if revision not in ("main", COMMIT):
            return self.fail(404, "RevisionNotFound")
        path = self.repos[repo] / filename
        if not path.is_file():
            return self.fail(404, "EntryNotFound")
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def fail(self, status: int, code: str):
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture()
def fake_hub(smoke_run, tmp_path):
    no_weights = tmp_path / "no-safetensors"
    no_weights.mkdir()
    shutil.copy(smoke_run / "resnet18" / "export" / "config.json", no_weights)
    (no_weights / "pytorch_model.bin").write_bytes(b"pickle is never loaded")
    FakeHub.repos = {"test/model": smoke_run / "resnet18" / "export", "test/pickle-only": no_weights}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()


LOAD = """
import json, sys
from dermadetect.inference import Predictor
from dermadetect.hub import ModelSourceError
try:
    p = Predictor(sys.argv[1])
    r = p.predict(sys.argv[2])
    print(json.dumps({"probs": r.probabilities, "ood_score": r.ood_score, "folder": str(p.loaded.folder)}))
except ModelSourceError as exc:
    print(json.dumps({"error": str(exc)}))
"""


def load_in_subprocess(source: str, image: str, endpoint: str, hf_home, offline: bool = False) -> dict:
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1" if offline else "0",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_TOKEN", None)
    result = subprocess.run([sys.executable, "-c", LOAD, source, image], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_download_pinned_revision_then_offline(fake_hub, smoke_run, small_data, tmp_path):
    endpoint, server = fake_hub
    image = str(next((small_data / "test").glob("*.jpg")))
    from dermadetect.inference import Predictor
    local = Predictor(str(smoke_run / "resnet18" / "export")).predict(image)
    expected = local.probabilities

    online = load_in_subprocess(f"hf-hub:test/model@{COMMIT}", image, endpoint, tmp_path / "hf")
    assert online["probs"] == pytest.approx(expected, abs=1e-6)
    # the OOD detector named in config.json came down with the weights
    assert local.ood_score is not None and online["ood_score"] == pytest.approx(local.ood_score, rel=1e-5)
    assert str(tmp_path / "hf") in online["folder"] and COMMIT in online["folder"]  # huggingface_hub's cache

    server.shutdown()  # no network from here on
    offline = load_in_subprocess(f"hf-hub:test/model@{COMMIT}", image, endpoint, tmp_path / "hf", offline=True)
    assert offline["probs"] == pytest.approx(expected, abs=1e-6)
    missing = load_in_subprocess("hf-hub:test/other", image, endpoint, tmp_path / "hf", offline=True)
    assert "test/other@main" in missing["error"] and "local cache" in missing["error"]


def test_wrong_revision_and_pickle_only_repo_are_refused(fake_hub, small_data, tmp_path):
    endpoint, _ = fake_hub
    image = str(next((small_data / "test").glob("*.jpg")))
    wrong = load_in_subprocess("hf-hub:test/model@v9.9", image, endpoint, tmp_path / "hf")
    assert "revision 'v9.9' does not exist in test/model" in wrong["error"]
    pickled = load_in_subprocess("hf-hub:test/pickle-only", image, endpoint, tmp_path / "hf")
    assert "has no model.safetensors" in pickled["error"] and "safetensors" in pickled["error"]


def copy_run_exports(run: Path, to: Path) -> Path:
    """A copy of a run without its training checkpoints (best/, state/): all that pushing reads."""
    return Path(shutil.copytree(run, to, ignore=shutil.ignore_patterns("best", "state", "outputs_*.npz")))


def test_push_hands_each_export_to_hfapi(smoke_run, tmp_path, monkeypatch):
    run = copy_run_exports(smoke_run, tmp_path / "run")
    calls = []

    class RecordingApi:
        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create_repo", repo_id, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message=None):
            calls.append(("upload_folder", repo_id, folder_path))
            card = (run / repo_id.split("-", 1)[1] / "export" / "README.md").read_text()
            assert f"hf-hub:{repo_id}" in card  # the card names the repo it is pushed to
            return type("Commit", (), {"commit_url": f"https://hf.co/{repo_id}/commit/{COMMIT}"})()

    monkeypatch.setattr("dermadetect.hub.HfApi", RecordingApi)
    monkeypatch.setattr("dermadetect.hub.get_token", lambda: "hf_test")
    assert push_run(run, DEFAULT_BACKBONES, "derma/dd", private=True) == 0
    for backbone in DEFAULT_BACKBONES:
        repo = f"derma/dd-{backbone}"
        assert ("create_repo", repo, True, True) in calls
        assert ("upload_folder", repo, str(run / backbone / "export")) in calls
    write_comparison([read_backbone_row(run / b) for b in DEFAULT_BACKBONES], run)
    table = (run / "comparison.md").read_text()
    assert f"Best ConvNeXtV2 (the demo's model): **convnextv2_nano** (Hub `derma/dd-convnextv2_nano`, commit " \
           f"https://hf.co/derma/dd-convnextv2_nano/commit/{COMMIT})" in table


def test_push_without_token_fails_clearly_after_export(smoke_run, tmp_path, monkeypatch):
    run = copy_run_exports(smoke_run, tmp_path / "run")
    monkeypatch.setattr("dermadetect.hub.get_token", lambda: None)
    assert push_run(run, DEFAULT_BACKBONES, "derma/dd", private=False) == 1
    assert all((run / b / "export" / "model.safetensors").is_file() for b in DEFAULT_BACKBONES)
