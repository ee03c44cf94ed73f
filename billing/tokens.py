"""Customer tokens (SPEC §5.10): what they are, how they are signed and checked, and what they
may call.

A token is a JWT signed with HS256 over the first key of `BILLING_PORTAL_SECRET`; its `kid`
header names the key (a short hash of it), so a token signed by an older key still in the list
keeps verifying after a rotation, and one signed by a key no longer listed does not. PyJWT makes
and checks them, with the algorithm pinned to HS256.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import jwt

from billing.errors import BillingError

Scope = Literal["read", "purchase"]
SCOPES: tuple[Scope, ...] = ("read", "purchase")
ALGORITHM = "HS256"
MIN_KEY_LENGTH = 32
MIN_TTL_SECONDS = 60
MAX_TTL_SECONDS = 86400
DEFAULT_TTL_SECONDS = 3600

#: What a customer token may call: `(method, route template)` -> the scope it needs. Every route
#: is of the token's own organization (`{org}` must be its `sub`).
PERMISSIONS: dict[tuple[str, str], Scope] = {
    **{("GET", f"/v1/orgs/{{org}}/{read}"): "read" for read in (
        "balance", "meter", "quota", "ledger", "notifications", "subscription", "holds")},
    ("POST", "/v1/orgs/{org}/checkout"): "purchase",
    ("POST", "/v1/orgs/{org}/billing-portal"): "purchase",
}


class TokenInvalid(BillingError):
    """An expired, revoked, malformed or wrongly signed customer token."""

    status = 401
    code = "TOKEN_INVALID"


class Forbidden(BillingError):
    """A valid customer token asking for something it may not do."""

    status = 403
    code = "FORBIDDEN"


class PortalNotConfigured(BillingError):
    status = 503
    code = "PORTAL_NOT_CONFIGURED"

    def __init__(self) -> None:
        super().__init__("customer tokens need BILLING_PORTAL_SECRET: set it and restart")


def key_id(key: str) -> str:
    """The `kid` that names a key: 16 hex digits of its SHA-256, never the key itself."""
    return hashlib.sha256(b"billing-portal-key:" + key.encode()).hexdigest()[:16]


def check_keys(keys: tuple[str, ...]) -> None:
    """Raise `ValueError` when a configured key is too short to sign with HS256 safely."""
    for index, key in enumerate(keys):
        if len(key) < MIN_KEY_LENGTH:
            raise ValueError(f"BILLING_PORTAL_SECRET: key {index + 1} has {len(key)} characters; "
                             f"use at least {MIN_KEY_LENGTH} random ones")


def new_token_id() -> str:
    return f"ctk_{secrets.token_urlsafe(18)}"


@dataclass(frozen=True)
class CustomerToken:
    """What a verified token says."""

    token_id: str
    org_id: str
    scopes: frozenset[Scope]
    expires_at: datetime


@dataclass(frozen=True)
class IssuedToken:
    token: str
    claims: CustomerToken


def issue(keys: tuple[str, ...], org_id: str, scopes: frozenset[Scope], *, ttl_seconds: int,
          now: datetime) -> IssuedToken:
    """A token for `org_id` signed with the first key, valid `ttl_seconds` from `now` (whole
    seconds, as JWT times are)."""
    if not keys:
        raise PortalNotConfigured()
    issued_at = now.replace(microsecond=0)
    claims = CustomerToken(token_id=new_token_id(), org_id=org_id, scopes=scopes,
                           expires_at=issued_at + timedelta(seconds=ttl_seconds))
    payload = {"sub": org_id, "scope": " ".join(sorted(scopes)), "jti": claims.token_id,
               "iat": issued_at, "exp": claims.expires_at}
    token = jwt.encode(payload, keys[0], algorithm=ALGORITHM, headers={"kid": key_id(keys[0])})
    return IssuedToken(token=token, claims=claims)


def looks_like_jwt(bearer: str) -> bool:
    """Three dot-separated parts: a customer token (valid or not), never an operator token."""
    return bearer.count(".") == 2


def verify(keys: tuple[str, ...], token: str) -> CustomerToken:
    """The claims of a token one of `keys` signed with HS256 and that has not expired; anything
    else raises `TokenInvalid`. Revocation is the store's to check."""
    if not keys:
        raise TokenInvalid("customer tokens are not enabled on this engine")
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.InvalidTokenError as exc:
        raise TokenInvalid("malformed customer token") from exc
    key = next((k for k in keys if isinstance(kid, str) and key_id(k) == kid), None)
    if key is None:
        raise TokenInvalid("customer token signed by a key this engine does not hold")
    try:
        payload: dict[str, Any] = jwt.decode(
            token, key, algorithms=[ALGORITHM],
            # `iat` is informational: a process whose clock is a second behind the one that
            # issued the token must not refuse it as "not yet valid".
            options={"require": ["sub", "scope", "jti", "exp"], "verify_iat": False})
    except jwt.ExpiredSignatureError as exc:
        raise TokenInvalid("customer token has expired") from exc
    except jwt.InvalidTokenError as exc:
        raise TokenInvalid("invalid customer token") from exc
    return _claims(payload)


def _claims(payload: dict[str, Any]) -> CustomerToken:
    sub, scope, jti, exp = (payload.get(name) for name in ("sub", "scope", "jti", "exp"))
    if not (isinstance(sub, str) and isinstance(scope, str) and isinstance(jti, str)
            and isinstance(exp, int)):
        raise TokenInvalid("invalid customer token claims")
    scopes = frozenset(scope.split())
    if not scopes <= set(SCOPES) or "read" not in scopes:
        raise TokenInvalid("invalid customer token scope")
    return CustomerToken(token_id=jti, org_id=sub,
                         scopes=frozenset(s for s in SCOPES if s in scopes),
                         expires_at=datetime.fromtimestamp(exp, UTC))


def authorize(token: CustomerToken, method: str, route: str, org_id: str | None) -> None:
    """Raise `Forbidden` unless `token` may call `method route` on `org_id` (PERMISSIONS)."""
    needed = PERMISSIONS.get((method, route))
    if needed is None:
        raise Forbidden(f"a customer token may not call {method} {route}")
    if org_id != token.org_id:
        raise Forbidden("a customer token reads only its own organization")
    if needed not in token.scopes:
        raise Forbidden(f"this customer token lacks the {needed!r} scope")
