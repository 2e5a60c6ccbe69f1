"""Authentication: hashing of the client's auth key, JWTs, login throttling.

The client never sends its password, only a key derived from it (``auth_key``);
the server stores an argon2 hash of that. Tokens are HS256 JWTs with ``sub``
(user id), ``iat``, ``exp``, ``did`` (the device, i.e. login session, they belong
to: deleting its row revokes them) and ``tv`` (token version: bumping it in the
users table revokes every outstanding token of that user). Both live in the
database, so every API node sees a revocation at once.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated
from uuid import UUID

from fastapi import Depends, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from jose import ExpiredSignatureError, JWTError, jwt
from passlib.context import CryptContext

from . import errors as E
from .config import Settings
from .db import MetadataStore, UserRecord
from .deps import get_db, get_settings
from .models import (KDF_MAX_LANES, KDF_MIN_ITERATIONS, KDF_MIN_MEMORY_KIB, KDF_MIN_SALT, KdfParams,
                     TokenResponse)
from .namespace import Scope

ALGORITHM = "HS256"

# The auth key is already a high-entropy argon2id output from the client, so the
# server-side hash only needs to make a stolen database useless, not slow down
# guessing of a weak password: moderate parameters keep logins cheap.
pwd_context = CryptContext(schemes=["argon2"], argon2__memory_cost=19456,
                           argon2__time_cost=2, argon2__parallelism=1)
# Each argon2 call takes 19 MiB: a burst of logins must queue, not add up (RSS).
_argon2_slots = threading.BoundedSemaphore(2)


def hash_auth_key(auth_key: str) -> str:
    with _argon2_slots:
        return pwd_context.hash(auth_key)


@lru_cache(maxsize=1)
def dummy_hash() -> str:
    return pwd_context.hash(secrets.token_urlsafe(32))


def verify_auth_key(auth_key: str, auth_hash: str | None) -> bool:
    """Constant-work verification: unknown users are checked against a dummy hash."""
    with _argon2_slots:
        if auth_hash is None:
            pwd_context.verify(auth_key, dummy_hash())
            return False
        try:
            return pwd_context.verify(auth_key, auth_hash)
        except (ValueError, TypeError):
            return False


# ------------------------------------------------------------------ tokens
def issue_token(settings: Settings, user_id: UUID, token_version: int, device: UUID,
                credential: str | None = None) -> TokenResponse:
    now = int(time.time())
    claims = {"sub": str(user_id), "iat": now, "exp": now + settings.token_ttl_seconds,
              "tv": token_version, "did": str(device)}
    token = jwt.encode(claims, settings.secret_key, algorithm=ALGORITHM)
    return TokenResponse(access_token=token, expires_in=settings.token_ttl_seconds, user_id=user_id,
                         device=credential)


def new_device_credential() -> tuple[str, str]:
    """(secret, its hash): the secret goes to the client once, the hash is kept."""
    secret = secrets.token_urlsafe(32)
    return secret, device_secret_hash(secret)


def device_secret_hash(secret: str) -> str:
    return hashlib.sha256(b"zkfs-device\0" + secret.encode()).hexdigest()


def parse_device_credential(value: str | None) -> tuple[UUID, str] | None:
    """``<device id>.<secret>`` from a login request, or None."""
    if not value or "." not in value:
        return None
    device, _, secret = value.partition(".")
    try:
        return UUID(device), secret
    except ValueError:
        return None


def decode_token(settings: Settings, token: str) -> tuple[UUID, int, UUID]:
    """(user id, token version, device) of a valid token; token_invalid / token_expired otherwise."""
    user_id, tv, device, exp = _verified_claims(settings.secret_key, token)
    if exp <= time.time():
        raise E.token_expired()
    return user_id, tv, device


@lru_cache(maxsize=4096)
def _verified_claims(secret_key: str, token: str) -> tuple[UUID, int, UUID, float]:
    """Signature and claim checks, done once per token: a client sends the same token
    with every request, and verifying it was a tenth of a small request's server time.
    Only successes are cached; expiry and revocation (tv, device) are checked per request."""
    try:
        header = jwt.get_unverified_header(token)
        if header.get("alg") != ALGORITHM:
            raise E.token_invalid()
        claims = jwt.decode(token, secret_key, algorithms=[ALGORITHM],
                            options={"require_exp": True, "require_iat": True, "require_sub": True})
        exp = claims.get("exp")
        if not isinstance(exp, (int, float)) or isinstance(exp, bool):
            raise E.token_invalid()
        tv = claims.get("tv")
        if not isinstance(tv, int) or isinstance(tv, bool):
            raise E.token_invalid()
        return UUID(claims["sub"]), tv, UUID(claims["did"]), float(exp)
    except ExpiredSignatureError:
        raise E.token_expired() from None
    except (JWTError, ValueError, TypeError, KeyError, AttributeError):
        raise E.token_invalid() from None


_bearer = HTTPBearer(auto_error=False)


async def current_user(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    settings: Annotated[Settings, Depends(get_settings)],
    db: Annotated[MetadataStore, Depends(get_db)],
) -> UserRecord:
    """The authenticated user (its device in ``request.state.device``); 401 for
    missing/invalid/expired/revoked tokens. Async on purpose: one indexed sqlite
    read costs less than a threadpool hop (a database over the network, which may
    stall while it restarts, gets the hop)."""
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise E.token_invalid("missing bearer token")
    user_id, tv, device = decode_token(settings, creds.credentials)
    if db.kind == "sqlite":
        user = db.get_session_user(user_id, device)
    else:
        user = await run_in_threadpool(db.get_session_user, user_id, device)
    if user is None or user.token_version != tv:
        raise E.token_invalid()
    request.state.device = device
    return user


CurrentUser = Annotated[UserRecord, Depends(current_user)]

# A member's requests into a share of another account's carry its id in this header.
SHARE_HEADER = "X-Zkfs-Share"


@dataclass(frozen=True)
class Access:
    """Who asks (``user``), whose rows the request works on (``owner``: the user's
    own, or a share's owner's) and the scope of them it may see."""
    user: UserRecord
    owner: UserRecord
    scope: Scope

    @property
    def share(self) -> UUID | None:
        return UUID(self.scope.share) if self.scope.share else None


async def current_access(user: CurrentUser, db: Annotated[MetadataStore, Depends(get_db)],
                         share: Annotated[UUID | None, Header(alias=SHARE_HEADER)] = None) -> Access:
    """The caller's own account, or with the share header a share it owns or belongs
    to; 404 for a share it does not (members removed, non-members: the same)."""
    if share is None:
        return Access(user, user, Scope(str(user.id)))
    found = await run_in_threadpool(db.share_access, share, user.id)
    if found is None:
        raise E.not_found("no such share")
    owner, read_only = found
    member = None if owner.id == user.id else str(user.id)
    return Access(user, owner, Scope(str(owner.id), str(share), member, read_only))


CurrentAccess = Annotated[Access, Depends(current_access)]


# ------------------------------------------------------------------ decoys
DEFAULT_DECOY = KdfParams(salt=base64.b64encode(bytes(16)).decode(), memory_kib=65536,
                          iterations=3, lanes=4)


def decoy_kdf(settings: Settings, username: str, template: KdfParams | None) -> KdfParams:
    """Stable fake KDF params for an unknown username (HMAC of the server secret),
    shaped like a real account's (never below the floor, with a check that no
    password verifies)."""
    t = template or DEFAULT_DECOY
    salt_len = min(max(len(base64.b64decode(t.salt)), KDF_MIN_SALT), 32)
    digest = hmac.new(bytes.fromhex(settings.secret_key), b"zkfs-kdf-decoy\0" + username.encode(),
                      hashlib.sha512).digest()
    return KdfParams(alg=t.alg, salt=base64.b64encode(digest[:salt_len]).decode(),
                     memory_kib=max(t.memory_kib, KDF_MIN_MEMORY_KIB),
                     iterations=max(t.iterations, KDF_MIN_ITERATIONS),
                     lanes=min(t.lanes, KDF_MAX_LANES),
                     check=base64.b64encode(digest[32:64]).decode())
