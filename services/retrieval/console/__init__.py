"""The investigator console: a static page (HTML, CSS, plain JavaScript) the ingress serves at
``/console/``. It talks to the ``/v1`` API with the investigator's key; the only other place it
fetches from is the site's object store, where the API redirects crop images (presigned URLs),
so it works on an air-gapped site.

The ingress calls :func:`asset` for ``GET /console/<name>`` (``""`` is the index page)."""

from __future__ import annotations

import re
from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
# One flat folder: a name is a single path segment, so "..", "/" and "\" never reach the disk.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*")


_ORIGIN = re.compile(r"https?://[A-Za-z0-9.:\[\]-]+")
_CONNECT = b"connect-src 'self'"


def asset(name: str, crop_origin: str | None = None) -> tuple[bytes, str]:
    """The bytes and content type of a console file; ``KeyError`` for anything else.
    ``crop_origin``: the object store's origin, where crop images are fetched from; the index
    page's own Content-Security-Policy lets the page connect there too."""
    name = name or "index.html"
    suffix = Path(name).suffix
    if not _NAME.fullmatch(name) or suffix not in CONTENT_TYPES:
        raise KeyError(name)
    path = STATIC_DIR / name
    if not path.is_file():
        raise KeyError(name)
    data = path.read_bytes()
    if name == "index.html" and crop_origin and _ORIGIN.fullmatch(crop_origin):
        data = data.replace(_CONNECT, _CONNECT + b" " + crop_origin.encode(), 1)
    return data, CONTENT_TYPES[suffix]
