"""Which origins the service answers as, and whether it is reached over TLS: for cookies and Origin checks.

The console's forms and the notebook proxy's cookie requests both refuse what another site's page sent,
and both set Secure cookies over TLS; they ask here.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.requests import HTTPConnection


def own_origins(connection: HTTPConnection, public_url: str | None) -> set[str]:
    """The origins the service answers as: the request's own (scheme and Host) and the public URL's."""
    scheme = "https" if connection.url.scheme in ("https", "wss") else "http"
    origins = {f"{scheme}://{connection.headers.get('host', '')}".lower()}
    if public_url:
        parts = urlsplit(public_url)
        origins.add(f"{parts.scheme}://{parts.netloc}".lower())
    return origins


def origin_of(url: str) -> str:
    """`scheme://host[:port]` of a URL (an Origin or Referer header), lower-cased as `own_origins` gives it."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def over_tls(connection: HTTPConnection, public_url: str | None) -> bool:
    """Whether cookies must be Secure: the request came over TLS, or the service is published at an https URL."""
    return connection.url.scheme in ("https", "wss") or (public_url or "").startswith("https://")
