"""Verify the OIDC token Pub/Sub signs each push with (`Authorization: Bearer <JWT>`).

A push subscription with authentication sends a Google-signed ID token whose audience is the
one configured on the subscription and whose `email` is its service account. Without that
check anyone who can reach the endpoint can post an envelope naming any subscription (a forged
delivery would count as received): on Cloud Run, require it.

The token signs nothing of the body, so the audience is what ties it to a subscription: with
`{subscription}` in the audience (`https://host/push?s={subscription}`, the subscription's id
put in), a token made for one subscription is refused on an envelope naming another. A receiver
serving several subscriptions requires it.

Google's signing keys are fetched from `certs_url` (a JSON object of key id -> PEM, the format
of https://www.googleapis.com/oauth2/v1/certs) and kept for an hour; a token signed by a key
not among them fetches them again, at most once every REFETCH_SECONDS, so tokens with invented
key ids cannot make this process hammer the URL.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

from google.auth import jwt

from eventaudit.http import echo

log = logging.getLogger(__name__)

GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
GOOGLE_ISSUERS = frozenset({"https://accounts.google.com", "accounts.google.com"})
KEEP_SECONDS = 3600.0
REFETCH_SECONDS = 30.0
CLOCK_SKEW_SECONDS = 10
MAX_TOKEN_CHARS = 8192


class Unauthorized(Exception):
    """No usable token: answered 401."""


class Forbidden(Exception):
    """A valid token of another account: answered 403."""


def fetch_certs(url: str, timeout: float = 5.0) -> dict[str, str]:
    """The signing keys at `url`: a JSON object of key id -> PEM."""
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        doc = json.loads(answer.read(1_000_000))
    if not isinstance(doc, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in doc.items()
    ):
        raise ValueError(f"{url} did not answer a JSON object of key id -> PEM")
    return doc


class TokenVerifier:
    """Checks a push's bearer token: signed by Google, for `audience`, from `service_account`."""

    def __init__(
        self,
        audience: str,
        service_account: str,
        certs_url: str = GOOGLE_CERTS_URL,
        fetch: Callable[[str], Mapping[str, str]] = fetch_certs,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._audience = audience
        self._account = service_account
        self._url = certs_url
        self._fetch = fetch
        self._monotonic = monotonic
        self._certs: Mapping[str, str] = {}
        self._fetched = -float("inf")
        self._lock = threading.Lock()

    @property
    def per_subscription(self) -> bool:
        """Whether each subscription has an audience of its own."""
        return "{subscription}" in self._audience

    def audience(self, subscription: str) -> str:
        """The audience a push of `subscription` must carry."""
        return self._audience.replace("{subscription}", subscription)

    def check_audience(self, claims: Mapping[str, Any], subscription: str) -> None:
        """Forbidden unless the verified token was made for pushes of `subscription`."""
        if claims.get("aud") != self.audience(subscription):
            raise Forbidden(f"the bearer token's audience is not that of {subscription}'s pushes")

    def verify(self, authorization: str | None) -> dict[str, Any]:
        """The token's claims, its signature, issuer, times and account checked (its audience
        by check_audience once the envelope names the subscription); Unauthorized or
        Forbidden saying why not."""
        if not authorization:
            raise Unauthorized("no Authorization header: a bearer token is required")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("Authorization must be `Bearer <token>`")
        if len(token) > MAX_TOKEN_CHARS or not token.isascii():
            raise Unauthorized("the bearer token is not a JWT")
        try:
            header = jwt.decode_header(token)
        except Exception:  # google-auth lets RecursionError out of a nested header, and more
            raise Unauthorized("the bearer token is not a JWT") from None
        kid = header.get("kid") if isinstance(header, dict) else None
        certs = self._keys(kid if isinstance(kid, str) else "")
        try:
            claims = jwt.decode(token, certs=certs, clock_skew_in_seconds=CLOCK_SKEW_SECONDS)
        except Exception as exc:  # its signature, times or shape (never a 500)
            raise Unauthorized(f"the bearer token is not valid: {_reason(exc)}") from None
        if not isinstance(claims, dict) or not all(
            type(claims.get(k)) is int for k in ("iat", "exp")
        ):
            raise Unauthorized("the bearer token's iat and exp must be whole seconds")
        if claims.get("iss") not in GOOGLE_ISSUERS:
            raise Unauthorized("the bearer token was not issued by Google")
        if claims.get("email") != self._account or claims.get("email_verified") is not True:
            raise Forbidden("the bearer token is not the push subscription's service account")
        return claims

    def _keys(self, kid: str) -> Mapping[str, str]:
        """The signing keys, fetched again when old, or when `kid` is not among them (at most
        once every REFETCH_SECONDS); on a failed fetch, the ones known."""
        with self._lock:
            age = self._monotonic() - self._fetched
            if age < KEEP_SECONDS and (kid in self._certs or age < REFETCH_SECONDS):
                return self._certs
            try:
                fetched = dict(self._fetch(self._url))
                if not fetched:
                    raise ValueError("no keys")
                self._certs = fetched
            except (OSError, ValueError) as exc:  # the keys known stay
                log.warning("could not fetch the push token signing keys: %s", exc)
            self._fetched = self._monotonic()
            return self._certs


def _reason(exc: Exception) -> str:
    """A short reason (escaped and cut: it may quote the token's own claims)."""
    return echo(str(exc) or type(exc).__name__, 120)
