"""Threading model: an `Access` is immutable once built (at start, by the controlling
thread) and read by the web server's event loop thread; its checks are pure.

Who may use the web surface. Three rules (docs/web.md):

- It listens on 127.0.0.1 unless told otherwise. Any other address needs a token: a
  random one is made at start, printed with the page's address (`?token=...`), and the
  page sends it with its WebSocket; a request without it, or with another, is refused.
- The Host header must name the address it listens on (or, on loopback, localhost),
  with its port: a page served from elsewhere whose name was rebound to this machine
  (DNS rebinding) carries its own name and is refused.
- A WebSocket whose Origin is not this server's own (`http://` + the Host) is refused,
  so a page on another site, open in the performer's browser, cannot drive the engine.
  A client that sends no Origin is no browser page, and is let through the Origin rule
  (it still needs the token off loopback).

This module knows nothing of aiohttp: it checks strings.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from dataclasses import dataclass

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Access:
    host: str  # the address bound
    port: int
    token: str | None  # None: no token needed (loopback)

    @classmethod
    def make(cls, host: str, port: int, token: str | None = None) -> Access:
        """Loopback needs no token (unless one is given); any other address gets a fresh one."""
        if token is None and not is_loopback(host):
            token = secrets.token_urlsafe(18)
        return cls(host, port, token)

    def hosts(self) -> set[str]:
        """The Host header values this server answers to."""
        names = set(LOOPBACK_NAMES) if is_loopback(self.host) else {self.host}
        if ":" in self.host and not self.host.startswith("["):
            names.add(f"[{self.host}]")
        if self.host in ("0.0.0.0", "::"):  # every address: the Host header cannot be checked against one
            return set()
        return {f"{n}:{self.port}" for n in names}

    def url(self, shown_host: str | None = None) -> str:
        host = shown_host or (self.host if self.host not in ("0.0.0.0", "::") else "127.0.0.1")
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"http://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    def check_host(self, host_header: str | None) -> str | None:
        """None if the Host header is acceptable, else why not."""
        allowed = self.hosts()
        if not allowed:
            return None
        if host_header not in allowed:
            return f"Host {host_header!r} is not this server ({', '.join(sorted(allowed))})"
        return None

    def check_socket(self, host_header: str | None, origin: str | None, token: str | None) -> str | None:
        """None if a WebSocket with these headers may connect, else why not."""
        why = self.check_host(host_header)
        if why:
            return why
        if origin is not None and origin != f"http://{host_header}":
            return f"Origin {origin!r} is not this page's (http://{host_header})"
        if self.token is not None and not (token and hmac.compare_digest(token.encode(), self.token.encode())):
            return "a token is needed (the one `live --web` printed at start, as ?token=...)"
        return None
