"""Deploying the demo to a Space: `python -m dermadetect space` against the local Hub, then the Space's files
alone, downloaded into an empty folder, run `app.py` as the Space does: no checkout and no DERMADETECT_DATA."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, App, served_model
from local_hub import LocalHub, client_env

SPACE = "someone/dermadetect-demo"


def deploy(env: dict, *args: str, repo: Path = REPO, space: str = SPACE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dermadetect", "space", space, "--repo", str(repo), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def hub():
    with LocalHub(orgs={SPACE.split("/")[0]}) as hub:
        yield hub


MODEL = "someone/dermadetect-convnextv2_nano"


def test_deployed_space_runs_the_demo_from_its_own_files(hub, ham224, tiny_export, tmp_path):
    env = {**client_env(hub, tmp_path / "hf"), "DERMADETECT_DATA": str(ham224.parent)}
    pushed = hub.add_repo(MODEL, {str(p.relative_to(tiny_export)): p for p in tiny_export.rglob("*") if p.is_file()})
    result = deploy(env, "--model", f"hf-hub:{MODEL}")
    assert result.returncode == 0, result.stderr
    space = hub._repos[("space", SPACE)]
    tree = space.resolve("main").tree
    bundled = next(p.split("/")[1] for p in tree if p.startswith("models/"))
    # the demo and nothing of the study; weights and images in LFS, as the Hub takes binary files
    demo = {"README.md", "LICENSE", "app.py", "requirements.txt", "dermadetect/inference.py", "docs/usage.md"}
    assert demo <= set(tree)
    assert not any(p.startswith(("tests/", "results/", "configs/", "benchmarks/")) for p in tree)
    examples = [p for p in tree if p.startswith(f"models/{bundled}/examples/")]
    assert len(examples) == 7 and all(tree[p].lfs for p in examples)
    assert tree[f"models/{bundled}/model.safetensors"].lfs and not tree["app.py"].lfs
    assert space.variables["DERMADETECT_MODEL"]["value"] == f"hf-hub:{MODEL}"

    # a second deploy makes main exactly the demo again: what an earlier one left is deleted
    hub.add_repo(SPACE, {"old_app.py": b"print('old')\n"}, repo_type="space")
    assert deploy(env).returncode == 0
    assert "old_app.py" not in hub.files(SPACE, repo_type="space")

    # the Space's files alone: the package and the bundled model come from them, the examples too
    folder = tmp_path / "space"
    for path, data in hub.files(SPACE, repo_type="space").items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    # a public Space runs without a token: the Hub answers the missing default model with 401, not 404
    space_env = {key: value for key, value in env.items() if key not in ("DERMADETECT_DATA", "PYTHONPATH", "HF_TOKEN")}
    with App(space_env, folder) as app:
        assert served_model(app) == f"bundled: {bundled}"
        assert "is not on the Hub yet" in app.text("fallback-notice")
        shown = app.examples()
        assert len(shown) == 7
        chart, overlay, summary = app.predict(str(folder / examples[0]))
        assert len(chart["confidences"]) == 7 and "not a diagnosis" in summary
    # with the variable the deploy set, the Space serves the pushed model
    with App({**space_env, "DERMADETECT_MODEL": space.variables["DERMADETECT_MODEL"]["value"]}, folder) as app:
        assert served_model(app) == f"{MODEL}@{pushed}" and not app.text("fallback-notice").strip()


def test_deploy_refusals_are_one_error_line(hub, ham224, tmp_path):
    env = {**client_env(hub, tmp_path / "hf"), "DERMADETECT_DATA": str(ham224.parent)}
    # without the data, the bundled model's examples cannot be shipped: nothing is created
    result = deploy({**env, "DERMADETECT_DATA": str(tmp_path)})
    assert result.returncode == 2 and "set DERMADETECT_DATA" in result.stderr
    assert "Traceback" not in result.stderr and ("space", SPACE) not in hub._repos
    # no token
    result = deploy({key: value for key, value in env.items() if key != "HF_TOKEN"})
    assert result.returncode == 2 and "no Hugging Face token" in result.stderr
    # a model that is not on the Hub cannot be a Space's model: the Space would not start
    result = deploy(env, "--model", "runs/x/convnextv2_nano/export")
    assert result.returncode == 2 and "hf-hub:ORG/NAME" in result.stderr
    result = deploy(env, "--model", "hf-hub:someone/not-pushed-yet")
    assert result.returncode == 2 and "is not on the Hub" in result.stderr and ("space", SPACE) not in hub._repos
    # a namespace the token's user is not in
    result = deploy(env, space="stranger/demo")
    assert result.returncode == 2 and "HTTP 403" in result.stderr and "write access to stranger" in result.stderr
    # README metadata the Hub refuses (a hex colour) is reported, and the Space keeps what it had
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("README.md", "LICENSE", "app.py", "requirements.txt", "dermadetect", "models"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(REPO / name, checkout / name)
    readme = checkout / "README.md"
    readme.write_text(readme.read_text().replace("colorFrom: pink", "colorFrom: '#ff00aa'", 1))
    result = deploy(env, repo=checkout)
    assert result.returncode == 2 and '"colorFrom" must be one of' in result.stderr
    assert "Traceback" not in result.stderr
    assert "app.py" not in hub.files(SPACE, repo_type="space")
