"""A local HTTP server speaking the part of the Hugging Face Hub API that ``huggingface_hub`` uses
to create a repo, a branch, validate a card's metadata, commit files (preupload + commit, files sent
inline) and download them
(``resolve``, HEAD and GET). Repos live in memory; the test points ``HF_ENDPOINT`` at it.
"""
import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict
from urllib.parse import unquote, urlparse

import yaml


class Repo:
    def __init__(self, private: bool) -> None:
        self.private = private
        self.branches: Dict[str, str] = {}  # branch -> commit sha
        self.commits: Dict[str, Dict[str, bytes]] = {}  # sha -> {path: content}


class HubState:
    def __init__(self) -> None:
        self.repos: Dict[str, Repo] = {}
        self.requests: list = []
        self.lock = threading.Lock()


def _sha(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


class HubHandler(BaseHTTPRequestHandler):
    state: HubState  # set by serve()

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _reply(self, status: int, body=None, headers: Dict[str, str] = None, head: bool = False) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if not headers or 'Content-Type' not in headers:
            self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str, head: bool = False) -> None:
        self._reply(status, {'error': message}, {'X-Error-Code': code, 'X-Error-Message': message}, head=head)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get('Content-Length', 0)))

    def do_POST(self) -> None:
        path = unquote(urlparse(self.path).path)
        self.state.requests.append(('POST', path))
        body = self._body()
        with self.state.lock:
            if path == '/api/repos/create':
                return self._create_repo(json.loads(body))
            if path == '/api/validate-yaml':
                return self._validate_yaml(json.loads(body)['content'])
            m = re.fullmatch(r'/api/models/(?P<repo>[^/]+/[^/]+)/(?P<action>preupload|commit|branch)/(?P<rev>.+)', path)
            if not m:
                return self._error(404, 'NotFound', f'no route POST {path}')
            repo = self.state.repos.get(m['repo'])
            if repo is None:
                return self._error(404, 'RepoNotFound', f'Repository {m["repo"]} not found')
            if m['action'] == 'branch':
                return self._create_branch(repo, m['rev'], json.loads(body or b'{}'))
            if m['rev'] not in repo.branches:
                return self._error(404, 'RevisionNotFound', f'Revision {m["rev"]} not found')
            if m['action'] == 'preupload':
                files = json.loads(body)['files']
                return self._reply(200, {'files': [
                    {'path': f['path'], 'uploadMode': 'regular', 'shouldIgnore': False} for f in files]})
            return self._commit(m['repo'], repo, m['rev'], body)

    def _create_repo(self, payload: dict) -> None:
        repo_id = f'{payload["organization"]}/{payload["name"]}' if payload.get('organization') else payload['name']
        url = f'http://{self.headers["Host"]}/{repo_id}'
        if repo_id in self.state.repos:  # like the Hub, the conflict still names the repo's url
            message = 'You already created this model repo'
            return self._reply(409, {'error': message, 'url': url}, {'X-Error-Message': message})
        repo = self.state.repos[repo_id] = Repo(bool(payload.get('private')))
        initial = _sha(repo_id.encode())
        repo.commits[initial] = {'.gitattributes': b'*.safetensors filter=lfs diff=lfs merge=lfs -text\n'}
        repo.branches['main'] = initial
        self._reply(200, {'url': url, 'name': repo_id, 'id': repo_id})

    def _validate_yaml(self, content: str) -> None:
        """The README's metadata block must be a YAML mapping (the Hub's first check)."""
        match = re.match(r'^---\n(.*?)\n---', content, re.S)
        try:
            meta = yaml.safe_load(match[1]) if match else {}
        except yaml.YAMLError as e:
            return self._reply(400, {'errors': [{'message': f'invalid YAML: {e}'}]})
        if not isinstance(meta, dict):
            return self._reply(400, {'errors': [{'message': 'metadata must be a YAML mapping'}]})
        self._reply(200, {'errors': [], 'warnings': []})

    def _create_branch(self, repo: Repo, branch: str, payload: dict) -> None:
        if branch in repo.branches:
            return self._error(409, 'BranchExists', f'Branch {branch} already exists')
        repo.branches[branch] = repo.branches[payload.get('startingPoint') or 'main']
        self._reply(200, {})

    def _commit(self, repo_id: str, repo: Repo, branch: str, body: bytes) -> None:
        files = dict(repo.commits[repo.branches[branch]])
        summary = ''
        for line in body.splitlines():
            item = json.loads(line)
            if item['key'] == 'header':
                summary = item['value']['summary']
            elif item['key'] == 'file':
                files[item['value']['path']] = base64.b64decode(item['value']['content'])
            else:
                return self._error(400, 'BadRequest', f'unsupported commit operation {item["key"]}')
        sha = _sha(json.dumps(sorted((p, _sha(c)) for p, c in files.items())).encode() + summary.encode())
        repo.commits[sha] = files
        repo.branches[branch] = sha
        host = self.headers['Host']
        self._reply(200, {'commitUrl': f'http://{host}/{repo_id}/commit/{sha}', 'commitOid': sha,
                          'pullRequestUrl': None})

    def _resolve(self, head: bool) -> None:
        path = unquote(urlparse(self.path).path)
        self.state.requests.append(('HEAD' if head else 'GET', path))
        m = re.fullmatch(r'/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)', path)
        if not m:
            return self._error(404, 'NotFound', f'no route {path}', head=head)
        with self.state.lock:
            repo = self.state.repos.get(m['repo'])
            if repo is None:
                return self._error(404, 'RepoNotFound', f'Repository {m["repo"]} not found', head=head)
            sha = repo.branches.get(m['rev'], m['rev'] if m['rev'] in repo.commits else None)
            if sha is None:
                return self._error(404, 'RevisionNotFound', f'Revision {m["rev"]} not found', head=head)
            content = repo.commits[sha].get(m['file'])
        if content is None:
            return self._error(404, 'EntryNotFound', f'{m["file"]} not found', head=head)
        self._reply(200, content, {'Content-Type': 'application/octet-stream', 'X-Repo-Commit': sha,
                                   'ETag': f'"{_sha(content)}"'}, head=head)

    def do_HEAD(self) -> None:
        self._resolve(head=True)

    def do_GET(self) -> None:
        self._resolve(head=False)


def serve() -> tuple:
    """Start the server on a free localhost port; returns ``(server, endpoint_url, state)``."""
    state = HubState()
    handler = type('Handler', (HubHandler,), {'state': state})
    server = ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f'http://127.0.0.1:{server.server_address[1]}', state
