"""A small Hugging Face Hub on loopback: the endpoints ``huggingface_hub`` calls to push and pull model repos.

It keeps repos in memory: each branch is a list of commits, each commit a full {path: bytes} snapshot. Uploads are
answered "regular" at preupload, so file contents arrive base64-encoded inside the commit call (no LFS, no Xet).
Tokens: any "Bearer hf_*" token is accepted, except ``BAD_TOKEN``, which gets a 401.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

BAD_TOKEN = "hf_invalid_token_for_tests"
USER = "tester"


class HubState:
    def __init__(self):
        self.repos: dict[str, dict[str, list[tuple[str, dict[str, bytes]]]]] = {}
        self.private: dict[str, bool] = {}
        self.requests: list[str] = []
        self.lock = threading.Lock()

    def head(self, repo: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        branches = self.repos.get(repo)
        if branches is None:
            return None
        if revision in branches:
            return branches[revision][-1]
        for commits in branches.values():  # a commit sha
            for sha, files in commits:
                if sha == revision:
                    return sha, files
        return None


def _sha(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


class Handler(BaseHTTPRequestHandler):
    state: HubState
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    # ------------------------------------------------------------------ helpers
    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict | None = None):
        self._send(status, json.dumps(payload).encode(), headers)

    def _error(self, status: int, code: str, message: str):
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization", "")
        if BAD_TOKEN in auth:
            self._error(401, "InvalidCredentials", "Invalid credentials in Authorization header")
            return False
        return True

    # ------------------------------------------------------------------ routes
    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        path = unquote(urlparse(self.path).path)
        self.state.requests.append(f"{self.command} {path}")
        if not self._authorized():
            return
        if path == "/api/whoami-v2":
            return self._json(200, {"name": USER, "type": "user", "auth": {"accessToken": {"role": "write"}}})
        m = re.match(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>.+))?$", path)
        if m:
            return self._model_info(m["repo"], m["rev"] or "main")
        m = re.match(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?$", path)
        if m:
            return self._tree(m["repo"], m["rev"])
        m = re.match(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$", path)
        if m:
            return self._resolve(m["repo"], m["rev"], m["file"])
        self._error(404, "NotFound", f"unknown endpoint {path}")

    def do_POST(self):
        path = unquote(urlparse(self.path).path)
        self.state.requests.append(f"POST {path}")
        body = self._body()
        if not self._authorized():
            return
        if path == "/api/repos/create":
            data = json.loads(body or b"{}")
            repo = f"{data.get('organization') or USER}/{data['name']}" if "/" not in data["name"] else data["name"]
            with self.state.lock:
                if repo not in self.state.repos:
                    self.state.repos[repo] = {"main": [(_sha(repo.encode()), {})]}
                    self.state.private[repo] = bool(data.get("private"))
                elif not data.get("exist_ok", True):
                    return self._error(409, "RepoExists", "You already created this model repo")
            return self._json(200, {"url": f"http://{self.headers['Host']}/{repo}", "name": repo})
        if path == "/api/validate-yaml":
            return self._json(200, {"errors": [], "warnings": []})
        m = re.match(r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>.+)$", path)
        if m:
            if m["repo"] not in self.state.repos:
                return self._error(404, "RepoNotFound", "Repository not found")
            files = json.loads(body)["files"]
            return self._json(
                200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        m = re.match(r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>.+)$", path)
        if m:
            return self._commit(m["repo"], m["rev"], body)
        m = re.match(r"^/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<branch>.+)$", path)
        if m:
            head = self.state.head(m["repo"], "main")
            if head is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            with self.state.lock:
                self.state.repos[m["repo"]].setdefault(m["branch"], [head])
            return self._json(200, {})
        self._error(404, "NotFound", f"unknown endpoint {path}")

    # ------------------------------------------------------------------ implementations
    def _model_info(self, repo: str, rev: str):
        if repo not in self.state.repos:
            return self._error(404, "RepoNotFound", "Repository not found")
        head = self.state.head(repo, rev)
        if head is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        sha, files = head
        return self._json(
            200,
            {
                "id": repo,
                "modelId": repo,
                "sha": sha,
                "private": self.state.private.get(repo, False),
                "siblings": [{"rfilename": p, "size": len(b)} for p, b in sorted(files.items())],
                "tags": [],
                "downloads": 0,
                "likes": 0,
            },
        )

    def _tree(self, repo: str, rev: str):
        head = self.state.head(repo, rev)
        if head is None:
            return self._error(404, "RepoNotFound" if repo not in self.state.repos else "RevisionNotFound", "nope")
        return self._json(
            200, [{"type": "file", "path": p, "size": len(b), "oid": _sha(b)} for p, b in sorted(head[1].items())]
        )

    def _resolve(self, repo: str, rev: str, file: str):
        if repo not in self.state.repos:
            return self._error(404, "RepoNotFound", "Repository not found")
        head = self.state.head(repo, rev)
        if head is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        sha, files = head
        if file not in files:
            return self._error(404, "EntryNotFound", f"{file} does not exist on {rev}")
        data = files[file]
        etag = f'"{_sha(data)}"'
        self._send(200, data, {"X-Repo-Commit": sha, "ETag": etag}, content_type="application/octet-stream")

    def _commit(self, repo: str, rev: str, body: bytes):
        if repo not in self.state.repos:
            return self._error(404, "RepoNotFound", "Repository not found")
        head = self.state.head(repo, rev)
        if head is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        files = dict(head[1])
        summary = ""
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "lfsFile":
                return self._error(400, "BadRequest", "this test hub accepts regular uploads only")
        sha = _sha((head[0] + summary + str(sorted(files))).encode() + b"".join(files[k] for k in sorted(files)))
        with self.state.lock:
            self.state.repos[repo].setdefault(rev, []).append((sha, files))
        host = self.headers["Host"]
        return self._json(
            200,
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"http://{host}/{repo}/commit/{sha}",
                "pullRequestUrl": None,
            },
        )


class LoopbackHub:
    """Start with ``with LoopbackHub() as hub: ...``; ``hub.endpoint`` is the URL to put in HF_ENDPOINT."""

    def __init__(self):
        self.state = HubState()
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LoopbackHub:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
