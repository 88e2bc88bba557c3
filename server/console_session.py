"""The console's session: a cookie the browser sends, and the CSRF rule that keeps other sites from
using it.

Signing in puts a credential in the `cohort_session` cookie: a login token from the user's
password (`/token`'s kind, expiring after COHORT_TOKEN_TTL_S) or the API key the user signed in
with (keeping its model restrictions). The cookie is `HttpOnly` (no script reads it), `Secure`
(browsers send it only over HTTPS, and to localhost), `SameSite=Strict` (no other site's page
sends it) and lives as long as a token. Every route takes it where it would take
`Authorization: Bearer`; a request that changes something and rides on the cookie must also
carry `X-CSRF-Token`, a digest of the credential the page learns from `GET /console/session`,
which another site's page can neither read nor guess. A request with its own Authorization
header needs none: no browser adds that header by itself.
"""

from __future__ import annotations

import hashlib
import hmac

from server.errors import PermissionDenied

SESSION_COOKIE = "cohort_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def csrf_token(credential: str) -> str:
    """The CSRF token of a session: bound to its credential, so it dies with it."""
    return hashlib.sha256(b"cohort-csrf:" + credential.encode()).hexdigest()[:40]


def check_csrf(method: str, credential: str, sent: str | None) -> None:
    """Refuse a state-changing request on the session cookie without its CSRF token."""
    if method in SAFE_METHODS:
        return
    if not sent or not hmac.compare_digest(sent, csrf_token(credential)):
        raise PermissionDenied(f"this request rides on the console's session cookie and must "
                               f"carry its {CSRF_HEADER} header", code="csrf_token_missing")


def cookie(credential: str, max_age_s: int) -> str:
    """The Set-Cookie value that opens a session."""
    return (f"{SESSION_COOKIE}={credential}; Max-Age={max_age_s}; Path=/; HttpOnly; Secure; "
            "SameSite=Strict")


def cleared_cookie() -> str:
    return f"{SESSION_COOKIE}=; Max-Age=0; Path=/; HttpOnly; Secure; SameSite=Strict"
