"""A Hugging Face Hub on 127.0.0.1, for tests without network: it answers
``huggingface_hub.hf_hub_download``'s two requests (HEAD, then GET, of
``/{repo_id}/resolve/{revision}/{filename}``) with the headers the client needs
(``X-Repo-Commit``, ``ETag``, ``Content-Length``) and counts the downloads."""

from __future__ import annotations

import collections
import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

COMMIT = '0123456789abcdef0123456789abcdef01234567'


def etag(filename: str, data: bytes) -> str:
    """The Hub's ETag: the sha256 of an LFS file (the weights), else git's blob sha1."""
    if filename.endswith('.safetensors'):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


class LocalHub:
    """``repos``: {repo_id: {filename: bytes}}, all at ``COMMIT``. A context manager;
    ``endpoint`` is its URL (``HF_ENDPOINT``), ``downloads`` counts GETs per file."""

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos = repos
        self.downloads: collections.Counter = collections.Counter()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, *args):
                del args

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def _answer(self, body: bool):
                repo_id, _, rest = unquote(urlsplit(self.path).path).lstrip('/').partition(
                    '/resolve/')
                revision, _, filename = rest.partition('/')
                files = hub.repos.get(repo_id)
                if files is None:
                    return self._error(401, 'RepoNotFound')
                if revision not in ('main', COMMIT):
                    return self._error(404, 'RevisionNotFound')
                if filename not in files:
                    return self._error(404, 'EntryNotFound')
                data = files[filename]
                self.send_response(200)
                self.send_header('X-Repo-Commit', COMMIT)
                self.send_header('ETag', f'"{etag(filename, data)}"')
                self.send_header('Content-Length', str(len(data)))
                self.end_headers()
                if body:
                    hub.downloads[filename] += 1
                    self.wfile.write(data)

            def _error(self, status: int, code: str):
                self.send_response(status)
                self.send_header('X-Error-Code', code)
                self.send_header('X-Repo-Commit', COMMIT)
                self.send_header('Content-Length', '0')
                self.end_headers()

        self._server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.endpoint = f'http://127.0.0.1:{self._server.server_address[1]}'
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> LocalHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
