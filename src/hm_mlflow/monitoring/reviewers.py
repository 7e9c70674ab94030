"""Who may label: readers sign in with a token that `hm-mlflow reviewer add NAME` prints once.

Only the token's SHA-256 is stored (a token is 256 random bits, so a plain hash is enough: it
cannot be guessed from its hash); it is sent as `Authorization: Bearer TOKEN`. Revoking a
reviewer ends their token at once. `hm-mlflow cloud reviewer add` makes the token on the
laptop and sends only its hash to the deployment.
"""

from __future__ import annotations

import hashlib
import re
import secrets

from hm_mlflow.monitoring.store import PredictionLog

TOKEN_PREFIX = "hmr_"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
HASH_PATTERN = re.compile(r"^[0-9a-f]{64}$")


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name or ""):
        raise ValueError(
            "a reviewer's name is 1 to 64 letters, digits, '.', '_', '@' or '-', starting with "
            "a letter or digit"
        )
    return name


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def add(store: PredictionLog, name: str, replace: bool = False) -> str:
    """Make a reviewer and return their token (shown once; only its hash is kept)."""
    token = new_token()
    add_hash(store, name, token_hash(token), replace)
    return token


def add_hash(store: PredictionLog, name: str, digest: str, replace: bool = False) -> None:
    """Make a reviewer from a token's hash made elsewhere."""
    if not HASH_PATTERN.match(digest):
        raise ValueError("a token hash is 64 lowercase hexadecimal digits (SHA-256)")
    store.add_reviewer(check_name(name), digest, replace)


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header, or None."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    return token


def authenticate(store: PredictionLog, authorization: str | None) -> str | None:
    """The active reviewer a request's Authorization header names, or None."""
    token = bearer(authorization)
    if token is None:
        return None
    return store.reviewer_for(token_hash(token))
