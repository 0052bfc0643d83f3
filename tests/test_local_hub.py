"""The local Hub against the real clients: huggingface_hub uploads and downloads, datasets.load_dataset and timm's
pretrained weights, each in a fresh interpreter that reaches the server through HF_ENDPOINT."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import subprocess
import sys
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from local_hub import LocalHub, client_env


@pytest.fixture()
def hub():
    with LocalHub() as hub:
        yield hub


def run_client(code: str, env: dict, *args) -> dict:
    """Run `code` in a new interpreter (huggingface_hub reads HF_ENDPOINT on import); it prints JSON last. The
    client leaves Xet aside unless `env` says otherwise, as the project's transfers do: this server has no Xet."""
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], env={"HF_HUB_DISABLE_XET": "1", **env},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def anonymous(env: dict) -> dict:
    return {key: value for key, value in env.items() if key != "HF_TOKEN"}


def image_bytes(value: int, format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buffer, format)
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


PUSH = """
import json, pathlib, sys
from huggingface_hub import HfApi
folder, repo = pathlib.Path(sys.argv[1]), sys.argv[2]
api = HfApi(token=sys.argv[3])
api.create_repo(repo, private=True)
api.create_repo(repo, private=True, exist_ok=True)  # the server's 409, which the client accepts
first = api.upload_folder(repo_id=repo, folder_path=folder, commit_message="first")
(folder / "config.json").write_text('{"num_classes": 7}')
second = api.upload_folder(repo_id=repo, folder_path=folder, commit_message="second")
print(json.dumps([first.oid, second.oid]))
"""

SNAPSHOT = """
import hashlib, json, pathlib, sys
from huggingface_hub import snapshot_download
repo, revision, patterns = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
folder = pathlib.Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
print(json.dumps({p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                  for p in folder.rglob("*") if p.is_file()}))
"""


def test_upload_folder_commits_and_snapshot_download_pins_revisions(hub, tmp_path):
    folder = tmp_path / "export"
    (folder / "examples").mkdir(parents=True)
    originals = {"config.json": b'{"num_classes": 3}', "model.safetensors": np.random.bytes(4096),
                 "README.md": b"---\nlicense: mit\ntags: [dermatology]\n---\n# A model\n",
                 "examples/x.jpg": image_bytes(90, "JPEG")}
    for path, data in originals.items():
        (folder / path).write_bytes(data)
    env = client_env(hub, tmp_path / "hf")

    first, second = run_client(PUSH, env, folder, "derma/model", hub.token)
    assert ("POST", "/api/repos/create", 409) in hub.requests
    with pytest.raises(urllib.error.HTTPError) as anonymous_read:  # private: the token is needed to read, too
        urllib.request.urlopen(f"{hub.url}/api/models/derma/model")
    assert anonymous_read.value.code == 401
    initial = hub.commits("derma/model")[0]
    assert hub.commits("derma/model") == [initial, first, second]  # create_repo's commit holds .gitattributes
    assert hub.files("derma/model", first)["config.json"] == originals["config.json"]
    assert hub.files("derma/model")["config.json"] == b'{"num_classes": 7}'
    # binary files went through the LFS batch API to storage, once each: the second push left them out
    uploads = sorted(path for method, path, status in hub.requests if method == "PUT" and status == 200)
    binaries = [originals["model.safetensors"], originals["examples/x.jpg"]]
    assert uploads == sorted(f"/upload/model/derma/model/{sha256(data)}" for data in binaries)

    allowed = run_client(SNAPSHOT, env, "derma/model", "main", '["*.json", "examples/*"]')
    assert allowed == {"config.json": sha256(b'{"num_classes": 7}'), "examples/x.jpg": sha256(binaries[1])}
    pinned = run_client(SNAPSHOT, env, "derma/model", first, "null")
    gitattributes = hub.files("derma/model", first)[".gitattributes"]
    assert pinned == {".gitattributes": sha256(gitattributes), **{p: sha256(d) for p, d in originals.items()}}
    assert ("HEAD", f"/derma/model/resolve/{first}/model.safetensors", 302) in hub.requests
    assert ("HEAD", f"/derma/model/resolve/{first}/config.json", 200) in hub.requests

    seen = len(hub.requests)
    offline = run_client(SNAPSHOT, {**env, "HF_HUB_OFFLINE": "1"}, "derma/model", first, "null")
    assert offline == pinned and len(hub.requests) == seen  # from the cache, not a single request


WRITE_WITHOUT_TOKEN = """
import json, sys
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
def status(call):
    try:
        call()
    except HfHubHTTPError as exc:
        return [exc.response.status_code, exc.response.headers.get("X-Error-Message")]
print(json.dumps({
    "upload": status(lambda: HfApi().upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="derma/model")),
    "create": status(lambda: HfApi().create_repo("derma/other")),
    "wrong_token": status(lambda: hf_hub_download("derma/model", "config.json", token="hf_wrong")),
}))
"""


def test_writes_need_the_token(hub, tmp_path):
    before = hub.add_repo("derma/model", {"config.json": b"{}"})
    answers = run_client(WRITE_WITHOUT_TOKEN, anonymous(client_env(hub, tmp_path / "hf")))
    assert answers["upload"][0] == 401 and answers["create"][0] == 401
    assert answers["wrong_token"] == [401, "Invalid credentials in Authorization header"]
    assert hub.commits("derma/model") == [before]


ERRORS = """
import json, sys
from huggingface_hub import HfFileSystem, hf_hub_download
token = sys.argv[1]
def outcome(repo, filename="config.json", **kwargs):
    try:
        return open(hf_hub_download(repo, filename, **kwargs)).read()
    except Exception as exc:
        return [exc.response.status_code, [c.__name__ for c in type(exc).__mro__]]
with HfFileSystem().open("derma/model/config.json", "rb", block_size=4) as f:
    f.seek(3)
    regular = f.read(5).decode()
with HfFileSystem().open("derma/model/weights.bin", "rb", block_size=4) as f:
    f.seek(10)
    lfs = f.read(6).hex()
print(json.dumps({
    "missing_repo": outcome("derma/none"), "bad_revision": outcome("derma/model", revision="v9.9"),
    "parquet_ref": outcome("derma/model", revision="refs/convert/parquet"),
    "missing_file": outcome("derma/model", "none.json"), "private": outcome("derma/secret"),
    "private_with_token": outcome("derma/secret", token=token), "main": outcome("derma/model"),
    "tag": outcome("derma/model", revision="v1"), "sha": outcome("derma/model", revision=sys.argv[2]),
    "regular_range": regular, "lfs_range": lfs,
}))
"""


def test_errors_revisions_and_ranges_map_as_on_the_hub(hub, tmp_path):
    weights = np.random.bytes(64)
    first = hub.add_repo("derma/model", {"config.json": b'{"version": 1}', "weights.bin": weights})
    hub.add_tag("derma/model", "v1")
    hub.add_repo("derma/model", {"config.json": b'{"version": 2}'}, message="second")
    hub.add_repo("derma/secret", {"config.json": b"{}"}, private=True)

    answers = run_client(ERRORS, anonymous(client_env(hub, tmp_path / "hf")), hub.token, first)
    for case, status, error in [("missing_repo", 401, "RepositoryNotFoundError"),
                                ("bad_revision", 404, "RevisionNotFoundError"),
                                ("parquet_ref", 404, "RevisionNotFoundError"),
                                ("missing_file", 404, "EntryNotFoundError"),
                                ("private", 401, "RepositoryNotFoundError")]:
        assert answers[case][0] == status and error in answers[case][1], (case, answers[case])
    assert ("HEAD", "/derma/model/resolve/refs%2Fconvert%2Fparquet/config.json", 404) in hub.requests
    assert answers["private_with_token"] == "{}"
    assert answers["main"] == '{"version": 2}'
    assert answers["tag"] == answers["sha"] == '{"version": 1}'  # old commits stay downloadable
    assert answers["regular_range"] == '{"version": 2}'[3:8] and answers["lfs_range"] == weights[10:16].hex()
    assert [path for method, path, status in hub.requests if status == 206] == [
        "/derma/model/resolve/main/config.json", f"/lfs/model/derma/model/{sha256(weights)}"]
    assert not [path for _, path, _ in hub.requests if "xet" in path]


XET_CLIENT = """
import json
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
try:
    hf_hub_download("derma/model", "weights.bin")
    print(json.dumps("downloaded"))
except HfHubHTTPError as exc:
    print(json.dumps([exc.response.status_code, exc.response.url.path]))
"""


def test_lfs_files_are_announced_in_xet_which_this_hub_cannot_serve(hub, tmp_path):
    """As on the Hub, an LFS file's answer names its Xet hash and token route; a client that takes Xet is
    refused at once, so a project transfer that does not leave Xet aside fails here instead of on the Hub."""
    first = hub.add_repo("derma/model", {"weights.bin": np.random.bytes(64)})
    answer = run_client(XET_CLIENT, {**client_env(hub, tmp_path / "hf"), "HF_HUB_DISABLE_XET": "0"})
    assert answer == [501, f"/api/models/derma/model/xet-read-token/{first}"]


def test_lfs_downloads_redirect_to_signed_storage_urls(hub):
    weights = np.random.bytes(100)
    hub.add_repo("derma/model", {"weights.bin": weights})
    connection = http.client.HTTPConnection(urlsplit(hub.url).netloc)
    connection.request("HEAD", "/derma/model/resolve/main/weights.bin")
    redirect = connection.getresponse()
    assert redirect.status == 302 and redirect.getheader("X-Linked-Size") == "100"
    assert redirect.getheader("X-Linked-Etag") == f'"{sha256(weights)}"'
    assert redirect.getheader("X-Xet-Hash") and 'rel="xet-auth"' in redirect.getheader("Link")
    location = redirect.getheader("Location")
    assert urlsplit(location).netloc != urlsplit(hub.url).netloc  # another origin: clients send it no token
    assert urllib.request.urlopen(location).read() == weights
    for forged in (location.replace("signature=", "signature=0"), location.replace("expires=", "expires=9")):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(forged)
        assert refused.value.code == 403


SPLITS = {"train": [0, 1], "validation": [2], "test": [3]}
README = """---
dataset_info:
  features:
  - name: image
    dtype: image
  - name: image_id
    dtype: string
  - name: lesion_id
    dtype: string
  - name: dx
    dtype: string
  splits:
{splits}
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: validation
    path: data/validation-*
  - split: test
    path: data/test-*
---
# Skin lesions
"""

LOAD_DATASET = """
import json, datasets
dataset = datasets.load_dataset("derma/skin")
print(json.dumps({split: {"rows": d.num_rows, "columns": d.column_names,
                          "image_feature": type(d.features["image"]).__name__,
                          "images": [[row["image_id"], row["image"].size, row["image"].getpixel((4, 4))] for row in d]}
                  for split, d in dataset.items()}))
"""


def test_load_dataset_reads_a_parquet_dataset_as_the_hub_stores_it(hub, tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "image_id": datasets.Value("string"),
                                  "lesion_id": datasets.Value("string"), "dx": datasets.Value("string")})
    files, splits = {}, []
    for split, ids in SPLITS.items():
        table = datasets.Dataset.from_dict({
            "image": [{"bytes": image_bytes(40 * i, "PNG"), "path": None} for i in ids],
            "image_id": [f"ISIC_{i}" for i in ids], "lesion_id": [f"HAM_{i}" for i in ids],
            "dx": ["nv"] * len(ids)}, features=features)
        table.to_parquet(tmp_path / f"{split}.parquet")
        files[f"data/{split}-00000-of-00001.parquet"] = (tmp_path / f"{split}.parquet").read_bytes()
        splits.append(f"  - name: {split}\n    num_bytes: {len(files[f'data/{split}-00000-of-00001.parquet'])}\n"
                      f"    num_examples: {len(ids)}")
    files["README.md"] = README.format(splits="\n".join(splits)).encode()
    hub.add_repo("derma/skin", files, repo_type="dataset")

    loaded = run_client(LOAD_DATASET, client_env(hub, tmp_path / "hf"))
    assert set(loaded) == set(SPLITS)
    for split, ids in SPLITS.items():
        assert loaded[split]["rows"] == len(ids) and loaded[split]["image_feature"] == "Image"
        assert loaded[split]["columns"] == ["image", "image_id", "lesion_id", "dx"]
        assert loaded[split]["images"] == [[f"ISIC_{i}", [8, 8], [40 * i] * 3] for i in ids]
    train, commit = "data/train-00000-of-00001.parquet", hub.commits("derma/skin", "dataset")[-1]
    assert ("HEAD", f"/datasets/derma/skin/resolve/{commit}/{train}", 302) in hub.requests  # parquet is LFS
    assert ("GET", f"/lfs/dataset/derma/skin/{sha256(files[train])}", 200) in hub.requests


TIMM_PRETRAINED = """
import json, sys, timm, torch
from safetensors.torch import load_file
served = load_file(sys.argv[1])
weights = timm.create_model("resnet18", pretrained=True).state_dict()
print(json.dumps({"same_keys": sorted(weights) == sorted(served),
                  "equal": all(torch.equal(weights[k], served[k]) for k in served)}))
"""


def test_timm_pretrained_resnet18_comes_from_the_hub_through_the_lfs_redirect(hub, tmp_path):
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("resnet18", pretrained=False)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in ("hf_hub_id", "url", "tag")}
    config = {"architecture": "resnet18", "num_classes": 1000, "pretrained_cfg": pretrained_cfg}
    hub.add_repo("timm/resnet18.a1_in1k", {"config.json": json.dumps(config).encode(),
                                           "model.safetensors": tmp_path / "model.safetensors"})

    env = {**client_env(hub, tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch")}
    assert run_client(TIMM_PRETRAINED, env, tmp_path / "model.safetensors") == {"same_keys": True, "equal": True}
    weights = sha256((tmp_path / "model.safetensors").read_bytes())
    # a file announced in Xet is fetched from its resolve URL again, which redirects: the Hub's LFS bridge
    assert hub.requests == [("HEAD", "/timm/resnet18.a1_in1k/resolve/main/model.safetensors", 302),
                            ("GET", "/timm/resnet18.a1_in1k/resolve/main/model.safetensors", 302),
                            ("GET", f"/lfs/model/timm/resnet18.a1_in1k/{weights}", 200)]
