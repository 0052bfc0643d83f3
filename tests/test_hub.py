"""Model cards, push and pull: the real huggingface_hub client, in fresh processes, against the local Hub."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from huggingface_hub import constants as hub_constants

from app import BUNDLED_MODEL
from conftest import REPO
from local_hub import LocalHub, client_env
from dermadetect.config import DEFAULT_BACKBONES, RunConfig
from dermadetect.hub import CARD_METRICS
from dermadetect.report import read_backbone_row, write_comparison
from dermadetect.transfer import without_xet


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
        # the card carries the run's settings, usable as train.py --config (the command's own file stays behind)
        settings = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])
        assert settings == json.loads((smoke_run / "config.json").read_text())["config"]
        assert json.loads(json.dumps(RunConfig.from_dict(settings).to_dict())) == settings


@pytest.fixture()
def local_hub(tiny_export, tmp_path):
    """A local Hub holding a model folder (test/model) and a repo with pickle weights only (test/pickle-only)."""
    with LocalHub() as hub:
        export = tiny_export
        files = {str(p.relative_to(export)): p for p in export.rglob("*") if p.is_file()}
        # a card and an analysis as an export writes them: the bundled model's
        files.update({name: BUNDLED_MODEL / name for name in ("README.md", "analysis.json")})
        files["gradcam_gallery.png"] = b"plots stay on the Hub page: never downloaded"
        files["notes/training-log.txt"] = b"not part of a model folder: never downloaded"
        hub.add_repo("test/model", files)
        hub.add_repo("test/pickle-only", {"config.json": export / "config.json",
                                          "pytorch_model.bin": b"pickle is never loaded"})
        yield hub


LOAD = """
import json, sys
from dermadetect.inference import Predictor
from dermadetect.hub import ModelSourceError
try:
    p = Predictor(sys.argv[1])
    r = p.predict(sys.argv[2])
    print(json.dumps({"probs": r.probabilities, "ood_score": r.ood_score, "folder": str(p.loaded.folder),
                      "source": p.loaded.source}))
except ModelSourceError as exc:
    print(json.dumps({"error": str(exc), "type": type(exc).__name__}))
"""


def load_in_subprocess(source: str, image: str, hub: LocalHub, hf_home, offline: bool = False, **env_changes) -> dict:
    env = {**client_env(hub, hf_home), "HF_HUB_OFFLINE": "1" if offline else "0", **env_changes}
    result = subprocess.run([sys.executable, "-c", LOAD, source, image], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def example_image(export: Path) -> str:
    return str(next((export / "examples").glob("*.jpg")))


def test_download_whole_model_folder_pinned_then_offline(local_hub, tiny_export, tmp_path):
    image = example_image(tiny_export)
    from dermadetect.inference import Predictor
    local = Predictor(str(tiny_export)).predict(image)
    first = local_hub.commits("test/model")[-1]
    local_hub.add_repo("test/model", {"README.md": b"---\nlicense: cc-by-nc-4.0\n---\nA later card\n"})

    online = load_in_subprocess(f"hf-hub:test/model@{first}", image, local_hub, tmp_path / "hf")
    assert online["probs"] == pytest.approx(local.probabilities, abs=1e-6)
    # the OOD detector named in config.json came down with the weights
    assert local.ood_score is not None and online["ood_score"] == pytest.approx(local.ood_score, rel=1e-5)
    folder = Path(online["folder"])
    assert str(tmp_path / "hf") in str(folder) and folder.name == first  # huggingface_hub's cache, that commit
    assert online["source"] == f"hf-hub:test/model@{first}"
    # the page needs the card, the analysis and the examples: the whole model folder, nothing else of the repo
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == sorted(
        ["README.md", "analysis.json"] + [str(p.relative_to(tiny_export)) for p in tiny_export.rglob("*")
                                          if p.is_file()])
    assert (folder / "README.md").read_text() == (BUNDLED_MODEL / "README.md").read_text()  # the pinned card

    latest = load_in_subprocess("hf-hub:test/model", image, local_hub, tmp_path / "hf")
    assert Path(latest["folder"]).name == local_hub.commits("test/model")[-1]
    assert (Path(latest["folder"]) / "README.md").read_text().endswith("A later card\n")

    short = load_in_subprocess(f"hf-hub:test/model@{first[:7]}", image, local_hub, tmp_path / "hf")
    assert Path(short["folder"]).name == first  # a short commit id, as the Hub's pages show it

    local_hub.stop()  # no network from here on
    for pin in (first, first[:7]):
        offline = load_in_subprocess(f"hf-hub:test/model@{pin}", image, local_hub, tmp_path / "hf", offline=True)
        assert offline["probs"] == pytest.approx(local.probabilities, abs=1e-6)
    unreachable = load_in_subprocess("hf-hub:test/model", image, local_hub, tmp_path / "hf")
    assert unreachable["folder"] == latest["folder"]  # the Hub does not answer: main as last cached
    missing = load_in_subprocess("hf-hub:test/other", image, local_hub, tmp_path / "hf", offline=True)
    assert missing["type"] == "HubUnreachable"
    assert "test/other@main" in missing["error"] and "local cache" in missing["error"]


def test_missing_repo_wrong_revision_and_pickle_only_repo_are_refused(local_hub, tiny_export, tmp_path):
    image = example_image(tiny_export)
    missing = load_in_subprocess("hf-hub:test/unpublished", image, local_hub, tmp_path / "hf")
    assert missing["type"] == "HubRepoMissing" and "test/unpublished does not exist on the Hub" in missing["error"]
    wrong = load_in_subprocess("hf-hub:test/model@v9.9", image, local_hub, tmp_path / "hf")
    assert "revision 'v9.9' does not exist in test/model" in wrong["error"]
    pickled = load_in_subprocess("hf-hub:test/pickle-only", image, local_hub, tmp_path / "hf")
    assert "has no model.safetensors" in pickled["error"] and "safetensors" in pickled["error"]


def test_hub_outage_serves_the_cache_and_a_refused_token_is_an_error(local_hub, tiny_export, tmp_path):
    """A Hub that answers 503 (down) or 429 (rate limit) is out of reach: the cached model is served, an uncached
    one is HubUnreachable. A token the Hub refuses (401) is the user's to fix: an error that says so, never a
    silent offline fallback."""
    image = example_image(tiny_export)
    cached = load_in_subprocess("hf-hub:test/model", image, local_hub, tmp_path / "hf")
    for status in (503, 429, 408):
        local_hub.outage = status
        down = load_in_subprocess("hf-hub:test/model", image, local_hub, tmp_path / "hf")
        assert down["folder"] == cached["folder"] and down["probs"] == cached["probs"], status
        uncached = load_in_subprocess("hf-hub:test/pickle-only", image, local_hub, tmp_path / "hf")
        assert uncached["type"] == "HubUnreachable" and "not reachable" in uncached["error"], status
    local_hub.outage = None
    # the Hub answers but its storage (the CDN) is down: as with the Hub down, never a token problem
    local_hub.add_repo("test/model", {"examples/later.jpg": Path(image).read_bytes() + b"\0"})  # a new blob
    local_hub.add_repo("test/copy", {p: local_hub.files("test/model")[p] for p in ("config.json", "model.safetensors")})
    local_hub.storage_outage = 503
    down = load_in_subprocess("hf-hub:test/model", image, local_hub, tmp_path / "hf")
    assert down.get("folder") == cached["folder"] and down["probs"] == cached["probs"], down
    uncached = load_in_subprocess("hf-hub:test/copy", image, local_hub, tmp_path / "hf")
    assert uncached["type"] == "HubUnreachable", uncached
    local_hub.storage_outage = None
    # the pull that broke off left main on the cached commit: offline, the cache still serves it
    offline = load_in_subprocess("hf-hub:test/model", image, local_hub, tmp_path / "hf", offline=True)
    assert offline.get("folder") == cached["folder"], offline
    refused = load_in_subprocess("hf-hub:test/model", image, local_hub, tmp_path / "hf2", HF_TOKEN="hf_revoked")
    assert refused["type"] == "ModelSourceError" and "HTTP 401" in refused["error"] and "HF_TOKEN" in refused["error"]


def copy_run_exports(run: Path, to: Path) -> Path:
    """A copy of a run without its training checkpoints (best/, state/): all that pushing reads."""
    return Path(shutil.copytree(run, to, ignore=shutil.ignore_patterns("best", "state", "outputs_*.npz")))


PUSH = "import sys; from dermadetect.pipeline import push_run; sys.exit(push_run(sys.argv[1], sys.argv[3:], sys.argv[2]))"


def test_push_uploads_each_export_and_records_the_commit(smoke_run, tmp_path):
    run = copy_run_exports(smoke_run, tmp_path / "run")
    with LocalHub() as hub:
        result = subprocess.run([sys.executable, "-c", PUSH, str(run), "derma/dd", *DEFAULT_BACKBONES], cwd=REPO,
                                env=client_env(hub, tmp_path / "hf"), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        for backbone in DEFAULT_BACKBONES:
            export = run / backbone / "export"
            served = hub.files(f"derma/dd-{backbone}")
            assert served.pop(".gitattributes")
            assert served == {str(p.relative_to(export)): p.read_bytes() for p in export.rglob("*") if p.is_file()}
            assert "hf-hub:derma/dd-" + backbone in served["README.md"].decode()  # the card names its repo
            recorded = json.loads((run / backbone / "hub.json").read_text())
            assert recorded["repo_id"] == f"derma/dd-{backbone}"
            assert recorded["commit_url"].endswith(hub.commits(f"derma/dd-{backbone}")[-1])
    write_comparison([read_backbone_row(run / b) for b in DEFAULT_BACKBONES], run)
    recorded = json.loads((run / "convnextv2_nano" / "hub.json").read_text())
    assert (f"Best ConvNeXtV2 (the demo's model): **convnextv2_nano** (Hub `derma/dd-convnextv2_nano`, commit "
            f"{recorded['commit_url']})") in (run / "comparison.md").read_text()


def test_push_keeps_a_published_model_that_serves_better(smoke_run, tmp_path):
    """A push never silently replaces a published model with a worse one (served test balanced accuracy, from
    the repo's analysis.json); forced, main becomes exactly the export, files of earlier pushes deleted."""
    run = copy_run_exports(smoke_run, tmp_path / "run")
    export = run / "resnet18" / "export"
    served = json.loads((export / "analysis.json").read_text())["test_final"]["balanced_accuracy"]
    better = json.loads((export / "analysis.json").read_text())
    better["test_final"]["balanced_accuracy"] = served + 0.1
    with LocalHub() as hub:
        env = client_env(hub, tmp_path / "hf")
        hub.add_repo("derma/dd-resnet18", {"README.md": b"a repo with no model yet"})
        first = subprocess.run([sys.executable, "-c", PUSH, str(run), "derma/dd", "resnet18"], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stderr[-3000:]  # nothing served there to compare with
        hub.add_repo("derma/dd-resnet18", {"analysis.json": json.dumps(better).encode(), "notes.txt": b"older"})
        before = hub.commits("derma/dd-resnet18")
        refused = subprocess.run([sys.executable, "-c", PUSH, str(run), "derma/dd", "resnet18"], cwd=REPO, env=env,
                                 capture_output=True, text=True, timeout=300)
        assert refused.returncode == 1 and hub.commits("derma/dd-resnet18") == before
        assert f"serves test balanced accuracy {served + 0.1:.3f}, above this export's {served:.3f}" in refused.stderr
        assert "--force" in refused.stderr
        forced = PUSH.replace("sys.argv[2])", "sys.argv[2], force=True)")
        result = subprocess.run([sys.executable, "-c", forced, str(run), "derma/dd", "resnet18"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        files = hub.files("derma/dd-resnet18")
        files.pop(".gitattributes")
        assert files == {str(p.relative_to(export)): p.read_bytes() for p in export.rglob("*") if p.is_file()}


def test_push_without_token_or_rights_fails_clearly_after_export(smoke_run, tmp_path):
    run = copy_run_exports(smoke_run, tmp_path / "run")
    with LocalHub(orgs={"derma"}) as hub:
        env = client_env(hub, tmp_path / "hf")

        def push(prefix: str, **env_changes) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-c", PUSH, str(run), prefix, "resnet18"], cwd=REPO,
                                  env={**env, **env_changes}, capture_output=True, text=True, timeout=300)

        result = push("derma/dd", HF_TOKEN="")
        assert result.returncode == 1
        assert "no Hugging Face token" in result.stderr and "the local export is complete" in result.stderr
        # someone else's repo, and a namespace the user is not in: the Hub refuses (403), retrying cannot help
        before = hub.add_repo("other/dd-resnet18", {"README.md": b"theirs"})
        for prefix in ("other/dd", "stranger/dd"):
            result = push(prefix)
            assert result.returncode == 1 and "HTTP 403" in result.stderr, result.stderr[-2000:]
            assert f"with write access to {prefix.split('/')[0]}" in result.stderr
            assert "again later" not in result.stderr
        assert hub.commits("other/dd-resnet18") == [before] and ("model", "stranger/dd-resnet18") not in hub._repos
    assert (run / "resnet18" / "export" / "model.safetensors").is_file()


def test_xet_stays_off_while_any_transfer_runs(monkeypatch):
    """Overlapping transfers in two threads: the first to end must not turn Xet back on under the other."""
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", False)
    started, first_done, seen = threading.Event(), threading.Event(), []

    def second():
        with without_xet():
            started.set()
            first_done.wait(10)
            seen.append(hub_constants.HF_HUB_DISABLE_XET)

    with without_xet():
        thread = threading.Thread(target=second)
        thread.start()
        started.wait(10)
    first_done.set()
    thread.join(10)
    assert seen == [True] and hub_constants.HF_HUB_DISABLE_XET is False
