"""A local Hugging Face Hub for tests. The real huggingface_hub, datasets and timm clients reach it through
HF_ENDPOINT and speak the Hub's HTTP protocol to it: resolve, repo info, tree, commits, LFS uploads, and LFS
downloads redirected to a separate storage origin as the Hub redirects them to its CDN."""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from base64 import b64decode
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import yaml

USER = "local-user"
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub stores any file of 10 MB or more in LFS
# The .gitattributes the Hub writes into every new repo: these patterns go to LFS whatever their size.
GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in (
    "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model *.msgpack *.npy *.npz *.onnx "
    "*.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors saved_model/**/* *.tar.* *.tar *.tflite *.tgz "
    "*.wasm *.xz *.zip *.zst *tfevents*").split())
SHORT_SHA = re.compile("[0-9a-f]{7,39}")  # the short commit ids the Hub shows and git prints
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# What the Hub checks in a Space's README metadata on every commit (docs: spaces-config-reference)
SPACE_SDKS = ("gradio", "docker", "static", "streamlit")
SPACE_COLORS = ("red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray")


class Blob:
    """A file's content, kept in git or in LFS (git then holds a pointer file in its place)."""

    def __init__(self, data: bytes, lfs: bool):
        self.data, self.lfs = data, lfs
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(data)}\n"
        stored = self.pointer.encode() if lfs else data
        self.oid = hashlib.sha1(b"blob %d\0" % len(stored) + stored).hexdigest()  # git's blob id


def now() -> str:
    """The time as the Hub's API writes it."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Commit:
    sha: str
    tree: dict[str, Blob]
    message: str
    parent: Commit | None
    date: str = field(default_factory=now)


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)  # LFS objects uploaded to this repo, by sha256
    variables: dict[str, dict] = field(default_factory=dict)  # a Space's variables, as the API lists them

    def resolve(self, revision: str) -> Commit | None:
        sha = self.branches.get(revision) or self.tags.get(revision) or revision
        if sha not in self.commits and SHORT_SHA.fullmatch(revision):  # the Hub takes a unique prefix, as git does
            found = [commit for commit in self.commits if commit.startswith(revision)]
            sha = found[0] if len(found) == 1 else sha
        return self.commits.get(sha)

    def commit(self, branch: str, tree: dict[str, Blob], message: str) -> Commit:
        parent = self.resolve(branch)
        sha = hashlib.sha1(f"{parent and parent.sha}{message}{sorted(tree)}{time.time_ns()}".encode()).hexdigest()
        self.commits[sha] = Commit(sha, tree, message, parent)
        self.branches[branch] = sha
        self.lfs.update({blob.sha256: blob.data for blob in tree.values() if blob.lfs})
        return self.commits[sha]


def stores_in_lfs(path: str, size: int, sample: bytes, gitattributes: str) -> bool:
    """The Hub's rule: an LFS pattern of .gitattributes, 10 MB or more, or binary (a NUL byte, as git decides)."""
    for line in gitattributes.splitlines():
        pattern = line.split()[0] if "filter=lfs" in line else None
        if pattern and fnmatch.fnmatchcase(path if "/" in pattern else path.rsplit("/", 1)[-1], pattern):
            return True
    return size >= LFS_MIN_SIZE or b"\0" in sample


def space_metadata_errors(card: str) -> list[str]:
    """What the Hub refuses in a Space's README.md metadata, one line per problem (none: accepted)."""
    try:
        meta = front_matter(card)
    except yaml.YAMLError:
        return ["the metadata is not valid YAML"]
    errors = [] if meta.get("sdk") in SPACE_SDKS else [f'"sdk" must be one of [{", ".join(SPACE_SDKS)}]']
    errors += [f'"{key}" must be one of [{", ".join(SPACE_COLORS)}]' for key in ("colorFrom", "colorTo")
               if key in meta and meta[key] not in SPACE_COLORS]
    if len(str(meta.get("short_description", ""))) > 60:
        errors.append('"short_description" length must be less than or equal to 60 characters long')
    return errors


def new_space_readme(name: str, sdk: str) -> str:
    """The card the Hub writes into a new Space."""
    return (f"---\ntitle: {name}\nemoji: 🚀\ncolorFrom: blue\ncolorTo: green\nsdk: {sdk}\npinned: false\n---\n\n"
            "Check out the configuration reference at https://huggingface.co/docs/hub/spaces-config-reference\n")


def front_matter(card: str) -> dict:
    """The YAML metadata block at the top of a README.md (raises yaml.YAMLError when it is not YAML)."""
    match = re.match(r"---\n(.*?)\n---", card, re.S)
    return (yaml.safe_load(match.group(1)) or {}) if match else {}


class LocalHub:
    """Model and dataset repos in memory, served on 127.0.0.1 (`url`); LFS content comes from a second server
    (`storage_url`), as the Hub's comes from its CDN. Writes need `Authorization: Bearer <token>`; `requests` logs
    (method, path, status) of both servers."""

    def __init__(self, token: str = "hf_local_test_token", orgs: set[str] | None = None):
        self.token = token
        self.orgs = orgs  # the organisations the token's user belongs to; None: every one in use
        self.requests: list[tuple[str, str, int]] = []
        self.outage: int | None = None  # e.g. 503 (down) or 429 (rate limit) for every request; storage serves
        self.storage_outage: int | None = None  # the same for the storage origin alone (the CDN), the Hub answering
        self._repos: dict[tuple[str, str], Repo] = {}
        self._lock = threading.RLock()
        self._secret = secrets.token_bytes(16)
        self._servers = [ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (HubHandler,), {
            "hub": self, "storage": storage})) for storage in (False, True)]
        self.url, self.storage_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in self._servers)
        for server in self._servers:
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()  # quick to stop

    def __enter__(self) -> LocalHub:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes | Path], repo_type: str = "model", private: bool = False,
                 message: str = "initial commit") -> str:
        """Commit `files` on main (LFS as the Hub decides), creating the repo with the Hub's .gitattributes in the
        same commit if it is new; the commit's sha."""
        with self._lock:
            repo = self._repos.setdefault((repo_type, repo_id), Repo(repo_type, repo_id, private))
            head = repo.resolve("main")
            tree = dict(head.tree) if head else {".gitattributes": Blob(GITATTRIBUTES.encode(), lfs=False)}
            for path, content in files.items():
                data = Path(content).read_bytes() if isinstance(content, Path) else content
                tree[path] = Blob(data, stores_in_lfs(path, len(data), data[:512], GITATTRIBUTES))
            return repo.commit("main", tree, message).sha

    def member_of(self, namespace: str) -> bool:
        return namespace == USER or self.orgs is None or namespace in self.orgs

    def commits(self, repo_id: str, repo_type: str = "model") -> list[str]:
        """The shas of main's history, oldest first."""
        commit, shas = self._repos[(repo_type, repo_id)].resolve("main"), []
        while commit:
            shas, commit = [commit.sha, *shas], commit.parent
        return shas

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        return {path: blob.data for path, blob in self._repos[(repo_type, repo_id)].resolve(revision).tree.items()}

    def add_tag(self, repo_id: str, tag: str, revision: str = "main", repo_type: str = "model") -> None:
        repo = self._repos[(repo_type, repo_id)]
        repo.tags[tag] = repo.resolve(revision).sha

    def signed_url(self, path: str, **params) -> str:
        """A storage URL that expires in an hour, signed as the CDN's and S3's are: it needs no token."""
        query = urlencode({**params, "expires": int(time.time()) + 3600}, quote_via=quote)
        signature = hmac.new(self._secret, f"{path}?{query}".encode(), "sha256").hexdigest()
        return f"{self.storage_url}{path}?{query}&signature={signature}"

    def signature_ok(self, raw_path: str) -> bool:
        unsigned, _, signature = raw_path.rpartition("&signature=")
        expected = hmac.new(self._secret, unsigned.encode(), "sha256").hexdigest()
        expires = parse_qs(urlsplit(unsigned).query).get("expires", ["0"])[0]
        return hmac.compare_digest(signature, expected) and int(expires) > time.time()


class HubHandler(BaseHTTPRequestHandler):
    """One request to the Hub (`storage` False) or to its LFS storage (`storage` True)."""
    hub: LocalHub
    storage: bool
    protocol_version = "HTTP/1.1"  # keep-alive, as the clients' connection pools expect

    def do_GET(self):
        self.dispatch()

    do_HEAD = do_POST = do_PUT = do_GET

    def log_request(self, code="-", size="-"):
        self.hub.requests.append((self.command, urlsplit(self.path).path, int(code)))

    def log_message(self, *args):
        pass

    def dispatch(self):
        url = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        if self.headers.get("Transfer-Encoding"):  # S3 takes no chunked uploads either
            self.close_connection = True
            return self.error(411, None, "MissingContentLength")
        # read even when refused, or the next request on this connection breaks
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = [unquote(part) for part in url.path.strip("/").split("/")]
        if self.storage:
            if self.hub.storage_outage:
                return self.error(self.hub.storage_outage, None, HTTPStatus(self.hub.storage_outage).phrase)
            return self.serve_storage(parts)
        if self.hub.outage:  # the Hub is down: every request gets the status it answers with then
            return self.error(self.hub.outage, None, HTTPStatus(self.hub.outage).phrase)
        auth = self.headers.get("Authorization")
        if auth is not None and auth != f"Bearer {self.hub.token}":
            return self.error(401, None, "Invalid credentials in Authorization header")
        self.authenticated = auth is not None
        if parts[0] == "api":
            return self.serve_api(parts[1:])
        repo_type = {"datasets": "dataset", "spaces": "space"}.get(parts[0], "model")
        parts = parts[1:] if repo_type != "model" else parts
        if len(parts) >= 4 and parts[2] == "resolve" and self.command in ("GET", "HEAD"):
            return self.resolve(repo_type, "/".join(parts[:2]), parts[3:])
        if len(parts) == 6 and parts[1].endswith(".git") and parts[2:5] == ["info", "lfs", "objects"]:
            return self.lfs(repo_type, f"{parts[0]}/{parts[1][:-4]}", parts[5])
        self.error(404, None, "Not Found")

    # --- answers

    def send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        for key, value in {"Content-Type": content_type, **(headers or {}), "Content-Length": len(body)}.items():
            self.send_header(key, str(value))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def flag(self, name: str) -> bool:
        return self.query.get(name, "").lower() in ("1", "true")

    def json(self, value, status: int = 200, content_type="application/json"):
        self.send(status, json.dumps(value).encode(), content_type=content_type)

    def error(self, status: int, code: str | None, message: str, headers: dict | None = None):
        headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {}), **(headers or {})}
        self.send(status, json.dumps({"error": message}).encode(), headers)

    def send_content(self, data: bytes, headers: dict):
        """The whole file, or the byte range asked for (206), as HfFileSystem reads files."""
        headers = {"Accept-Ranges": "bytes", **headers}
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        first, last = match.groups() if match else ("", "")
        if not (first or last):
            return self.send(200, data, headers, "application/octet-stream")
        start = int(first) if first else max(len(data) - int(last), 0)
        end = min(int(last), len(data) - 1) if first and last else len(data) - 1
        if start > end:
            return self.error(416, None, "Range Not Satisfiable", {"Content-Range": f"bytes */{len(data)}"})
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self.send(206, data[start:end + 1], headers, "application/octet-stream")

    # --- repos and revisions

    def find_repo(self, repo_type: str, repo_id: str, write: bool = False) -> Repo | None:
        """The repo if this caller may see it (and write to it); otherwise answer as the Hub does and return None."""
        if write and not self.authenticated:
            return self.error(401, None, "Invalid username or password.")
        repo = self.hub._repos.get((repo_type, repo_id))
        member = self.authenticated and self.hub.member_of(repo_id.split("/")[0])
        if repo is None or (repo.private and not member):
            # 401 to anonymous callers, as on the Hub, so that they cannot tell private from missing
            return self.error(404 if self.authenticated else 401, "RepoNotFound", "Repository not found")
        if write and not member:
            return self.error(403, None, f"You don't have the rights to write to {repo_id}")
        return repo

    def find_commit(self, repo: Repo, revision: str) -> Commit | None:
        if (commit := repo.resolve(revision)) is None:
            self.error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def resolve(self, repo_type: str, repo_id: str, rest: list[str]):
        """/{repo}/resolve/{revision}/{path}: regular files directly, LFS files by a 302 to signed storage."""
        split = 3 if rest[0] == "refs" else 1  # datasets sends refs/convert/parquet unquoted, as three segments
        revision, path = "/".join(rest[:split]), "/".join(rest[split:])
        if not (repo := self.find_repo(repo_type, repo_id)) or not (commit := self.find_commit(repo, revision)):
            return
        headers = {"X-Repo-Commit": commit.sha}
        if (blob := commit.tree.get(path)) is None:
            return self.error(404, "EntryNotFound", "Entry not found", headers)
        if not blob.lfs:
            return self.send_content(blob.data, {**headers, "ETag": f'"{blob.oid}"'})
        location = self.hub.signed_url(f"/lfs/{repo_type}/{repo_id}/{blob.sha256}", filename=path.split("/")[-1])
        # the Hub stores LFS files in Xet and says so, with where a Xet client gets its token; the redirect is
        # the bridge for clients without Xet. This server has no Xet storage: a Xet client fails here
        xet_auth = f"{self.hub.url}/api/{repo_type}s/{repo_id}/xet-read-token/{commit.sha}"
        self.send(302, f"Found. Redirecting to {location}".encode(), {
            **headers, "Location": location, "ETag": f'"{blob.oid}"', "X-Linked-Etag": f'"{blob.sha256}"',
            "X-Linked-Size": len(blob.data), "X-Xet-Hash": blob.sha256, "Link": f'<{xet_auth}>; rel="xet-auth"'},
            "text/plain; charset=utf-8")

    def serve_storage(self, parts: list[str]):
        """The CDN (GET /lfs/{repo}/{oid}) and S3 (PUT /upload/{repo}/{oid}) behind the Hub: signed URLs only."""
        if not self.hub.signature_ok(self.path):
            return self.error(403, None, "AccessDenied: the signature does not match or has expired")
        repo, oid = self.hub._repos[(parts[1], "/".join(parts[2:4]))], parts[4]
        if parts[0] == "lfs" and self.command in ("GET", "HEAD"):
            disposition = f"attachment; filename*=UTF-8''{quote(self.query['filename'])}"
            return self.send_content(repo.lfs[oid], {"ETag": f'"{oid}"', "Content-Disposition": disposition})
        if parts[0] == "upload" and self.command == "PUT":
            if hashlib.sha256(self.body).hexdigest() != oid or len(self.body) != int(self.query["size"]):
                return self.error(400, None, "BadDigest: the content does not match its sha256 and size")
            with self.hub._lock:
                repo.lfs[oid] = self.body
            return self.send(200, headers={"ETag": f'"{hashlib.md5(self.body).hexdigest()}"'})
        self.error(405, None, "MethodNotAllowed")

    def lfs(self, repo_type: str, repo_id: str, action: str):
        """The Git LFS batch API (uploads, "basic" transfer) and the verify step after each upload."""
        if self.command != "POST":
            return self.error(405, None, "Method Not Allowed")
        if not (repo := self.find_repo(repo_type, repo_id, write=True)):
            return
        request = json.loads(self.body)
        if action == "verify":
            if len(repo.lfs.get(request["oid"], b"")) != request["size"]:
                return self.error(404, None, f"Object {request['oid']} was not uploaded")
            return self.json({"success": True})
        if request.get("operation") != "upload" or "basic" not in request.get("transfers", ["basic"]):
            return self.error(422, None, "Only uploads by the basic transfer are supported")
        verify = {"href": f"{self.hub.url}/{URL_PREFIX[repo_type]}{repo_id}.git/info/lfs/objects/verify"}
        objects = []
        for obj in request["objects"]:
            if obj["oid"] not in repo.lfs:  # an object the repo already holds gets no actions: nothing to send
                upload = self.hub.signed_url(f"/upload/{repo_type}/{repo_id}/{obj['oid']}", size=obj["size"])
                obj = {**obj, "authenticated": True, "actions": {"upload": {"href": upload}, "verify": verify}}
            objects.append(obj)
        self.json({"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    # --- /api

    def serve_api(self, parts: list[str]):
        if parts == ["whoami-v2"] and self.authenticated:
            orgs = sorted(self.hub.orgs if self.hub.orgs is not None else
                          {repo_id.split("/")[0] for _, repo_id in self.hub._repos} - {USER})
            return self.json({"type": "user", "name": USER, "orgs": [{"type": "org", "name": org} for org in orgs],
                              "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
        if parts == ["whoami-v2"]:
            return self.error(401, None, "Invalid username or password.")
        if parts == ["repos", "create"] and self.command == "POST":
            return self.create_repo(json.loads(self.body))
        if parts == ["validate-yaml"] and self.command == "POST":
            try:
                valid = isinstance(front_matter(json.loads(self.body)["content"]), dict)
            except yaml.YAMLError:
                valid = False
            errors = [] if valid else [{"message": "the metadata of README.md is not a YAML mapping"}]
            return self.json({"errors": errors, "warnings": []}, 200 if valid else 400)
        if len(parts) < 3 or parts[0] not in ("models", "datasets", "spaces"):
            return self.error(404, None, "Not Found")
        repo_type, repo_id, action, rest = parts[0][:-1], "/".join(parts[1:3]), (parts[3:4] or [""])[0], parts[4:]
        if repo_type == "space" and action == "variables":
            return self.space_variables(repo_id)
        if action.startswith("xet-"):
            return self.error(501, None, "This local Hub stores files in LFS only: set HF_HUB_DISABLE_XET=1")
        if not (repo := self.find_repo(repo_type, repo_id, write=action in ("preupload", "commit"))):
            return
        revision = "/".join(rest if action == "revision" else rest[:1]) or "main"
        if not (commit := self.find_commit(repo, revision)):
            return
        if action in ("", "revision") and self.command == "GET":
            return self.repo_info(repo, commit)
        if action == "tree" and self.command == "GET":
            return self.tree(commit, "/".join(rest[1:]))
        if action == "paths-info" and self.command == "POST":
            form = parse_qs(self.body.decode())  # huggingface_hub posts these as a form, not JSON
            paths = [p for p in form.get("paths", []) if p in commit.tree or tree_entries(commit, p)]
            return self.json([entry_json(commit, p, form.get("expand") == ["true"]) for p in paths])
        if action == "preupload" and self.command == "POST":
            return self.preupload(commit)
        if action == "commit" and self.command == "POST":
            return self.commit(repo, revision)
        self.error(404, None, "Not Found")

    def create_repo(self, request: dict):
        if not self.authenticated:
            return self.error(401, None, "Invalid username or password.")
        repo_type, repo_id = request.get("type") or "model", f"{request.get('organization') or USER}/{request['name']}"
        if repo_type not in URL_PREFIX:
            return self.error(400, None, f"This local Hub serves models, datasets and Spaces, not {repo_type}s")
        if not self.hub.member_of(repo_id.split("/")[0]):
            return self.error(403, None, f"You don't have the rights to create a {repo_type} under the namespace "
                                         f"\"{repo_id.split('/')[0]}\"")
        if repo_type == "space" and request.get("sdk") not in SPACE_SDKS:
            return self.error(400, None, f"A Space needs an sdk, one of {', '.join(SPACE_SDKS)}")
        url = f"{self.hub.url}/{URL_PREFIX[repo_type]}{repo_id}"
        with self.hub._lock:
            if (repo_type, repo_id) in self.hub._repos:
                return self.json({"error": f"You already created this {repo_type} repo", "url": url}, 409)
            private = request.get("private", request.get("visibility") == "private")
            repo = self.hub._repos[(repo_type, repo_id)] = Repo(repo_type, repo_id, bool(private))
            tree = {".gitattributes": Blob(GITATTRIBUTES.encode(), lfs=False)}
            if repo_type == "space":
                tree["README.md"] = Blob(new_space_readme(request["name"], request["sdk"]).encode(), lfs=False)
            repo.commit("main", tree, "initial commit")
        self.json({"url": url, "name": repo_id, "id": repo_id})

    def space_variables(self, repo_id: str):
        """GET lists a Space's variables; POST {key, value[, description]} adds or updates one."""
        if not (repo := self.find_repo("space", repo_id, write=self.command == "POST")):
            return
        if self.command == "POST":
            request = json.loads(self.body)
            with self.hub._lock:
                repo.variables[request["key"]] = {"value": request["value"], "description": request.get("description"),
                                                  "updatedAt": now()}
        self.json(repo.variables)

    def repo_info(self, repo: Repo, commit: Commit):
        def sibling(path: str, blob: Blob) -> dict:
            if not self.flag("blobs"):
                return {"rfilename": path}
            lfs = {"lfs": {"sha256": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}}
            return {"rfilename": path, "size": len(blob.data), "blobId": blob.oid, **(lfs if blob.lfs else {})}

        card = front_matter(commit.tree["README.md"].data.decode()) if "README.md" in commit.tree else {}
        self.json({"_id": repo.repo_id, "id": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": commit.sha,
                   "lastModified": commit.date, "private": repo.private, "gated": False, "disabled": False,
                   "downloads": 0, "likes": 0, "tags": card.get("tags") or [], "cardData": card,
                   "siblings": [sibling(path, blob) for path, blob in sorted(commit.tree.items())]})

    def tree(self, commit: Commit, path: str):
        entries = tree_entries(commit, path)
        if path and (path in commit.tree or not entries):
            return self.error(404, "EntryNotFound", f"{path} is not a folder of this revision")
        depth = path.count("/") + 1 if path else 0
        self.json([entry_json(commit, p, self.flag("expand")) for p in entries if self.flag("recursive")
                   or p.count("/") == depth])

    def preupload(self, commit: Commit):
        rules = commit.tree[".gitattributes"].data.decode() if ".gitattributes" in commit.tree else ""
        answers = []
        for file in json.loads(self.body)["files"]:
            lfs = stores_in_lfs(file["path"], file["size"], b64decode(file["sample"]), rules)
            existing = commit.tree.get(file["path"])  # its oid lets the client leave unchanged files out
            answers.append({"path": file["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": existing and (existing.sha256 if existing.lfs else existing.oid)})
        self.json({"files": answers, "commitOid": commit.sha})

    def commit(self, repo: Repo, branch: str):
        """NDJSON: a header line, then file (base64), lfsFile (uploaded before), deletedFile/deletedFolder lines."""
        if self.query.get("create_pr"):
            return self.error(400, None, "This local Hub has no pull requests")
        if branch not in repo.branches:
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {branch}")
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        with self.hub._lock:
            head = repo.resolve(branch)
            header, tree = lines[0]["value"], dict(head.tree)
            if header.get("parentCommit") not in (None, head.sha):
                return self.error(412, None, "A commit has happened since. Please refresh and try again.")
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file" and stores_in_lfs(value["path"], len(data := b64decode(value["content"])), data, ""):
                    return self.error(400, None, "Your push was rejected because it contains binary files or files "
                                      "larger than 10 MiB: upload them to LFS")
                elif key == "file":
                    tree[value["path"]] = Blob(data, lfs=False)
                elif key == "lfsFile" and value["oid"] in repo.lfs:
                    tree[value["path"]] = Blob(repo.lfs[value["oid"]], lfs=True)
                elif key == "deletedFile" and value["path"] in tree:
                    del tree[value["path"]]
                elif key == "deletedFolder":
                    tree = {p: b for p, b in tree.items() if not p.startswith(value["path"].rstrip("/") + "/")}
                else:
                    return self.error(400, None, f"Cannot apply {key} to {value.get('path')}: no such file or object")
            if repo.repo_type == "space" and (errors := space_metadata_errors(tree["README.md"].data.decode()
                                                                             if "README.md" in tree else "")):
                return self.error(400, None, "Invalid metadata in README.md.\n" + "\n".join(f"- {e}" for e in errors))
            sha = repo.commit(branch, tree, header["summary"]).sha
        self.json({"success": True, "commitOid": sha, "hookOutput": "",
                   "commitUrl": f"{self.hub.url}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}/commit/{sha}"})


def tree_entries(commit: Commit, path: str) -> list[str]:
    """The files and folders below `path` (the repo root when empty), at any depth, sorted."""
    prefix = f"{path.strip('/')}/" if path.strip("/") else ""
    return sorted({"/".join(parts[:i]) for file in commit.tree if file.startswith(prefix)
                   for parts in [file.split("/")] for i in range(prefix.count("/") + 1, len(parts) + 1)})


def subtree(commit: Commit, path: str) -> dict[str, str]:
    return {p: blob.oid for p, blob in commit.tree.items() if p == path or p.startswith(f"{path}/")}


def entry_json(commit: Commit, path: str, expand: bool) -> dict:
    """A tree entry as /tree and /paths-info give it; `expand` adds the last commit that changed it."""
    if (blob := commit.tree.get(path)) is None:
        folder_oid = hashlib.sha1(json.dumps(subtree(commit, path), sort_keys=True).encode()).hexdigest()
        entry = {"type": "directory", "oid": folder_oid, "size": 0, "path": path}
    else:
        entry = {"type": "file", "oid": blob.oid, "size": len(blob.data), "path": path}
        if blob.lfs:
            entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
    if expand:
        last = commit
        while last.parent and subtree(last.parent, path) == subtree(last, path):
            last = last.parent
        entry["lastCommit"] = {"id": last.sha, "title": last.message, "date": last.date}
    return entry


def client_env(hub: LocalHub, hf_home: Path | str) -> dict[str, str]:
    """The environment of a client subprocess that uses `hub` as its Hub, with a cache of its own under `hf_home`."""
    # the caller's HF_HUB_CACHE, HF_DATASETS_OFFLINE and the like would override HF_HOME or go offline
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    # no HF_HUB_DISABLE_XET: this server advertises Xet as the Hub does and cannot serve it, so the project's
    # own transfers must leave Xet aside themselves (hub.without_xet), as they must with the Hub
    return {**env, "HF_ENDPOINT": hub.url, "HF_HOME": str(hf_home), "HF_TOKEN": hub.token,
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0"}
