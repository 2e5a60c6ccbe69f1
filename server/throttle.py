"""Login throttling that slows guessing without locking out the right key.

Every attempt to prove a password-derived key (login, password change, deleting
the account or replacing master keys) is counted in the database *before* the
key is checked (atomic, and shared by all API nodes), under:

* ``ua:<user>|<addr>``: one account from one address (5 per 15 min);
* ``u:<user>``: one account from anywhere (100 per 15 min: a distributed guess);
* ``a:<addr>``: one address, whatever the account (20 per 15 min);

unless the caller proves it is a device of the account (its device credential
from an earlier login, or a token naming that device): then only ``d:<device>``
(5 per 15 min) counts, so guessing by others never refuses a known device's key
(a mount renewing its token). A success removes its own count and its
account+address (or device) history; failures stay for the window. Unknown
accounts are counted exactly like real ones, so a refusal tells nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from . import errors as E
from .config import (LOGIN_MAX_PER_ADDR, LOGIN_MAX_PER_USER, LOGIN_MAX_PER_USER_ADDR, LOGIN_WINDOW,
                     REGISTRATION_WINDOW)
from .db import MetadataStore


@dataclass
class Attempt:
    db: MetadataStore
    keys: list[str]
    at: float
    clear: list[str]

    def succeeded(self) -> None:
        self.db.release_attempt(self.keys, self.at, self.clear)


def attempt(db: MetadataStore, username: str, addr: str, device: UUID | None = None) -> Attempt:
    """Count one key check (429 ``throttled`` when over a limit)."""
    name = username.lower()
    if device is not None:
        limits = [(f"d:{device}", LOGIN_MAX_PER_USER_ADDR)]
        clear = [limits[0][0]]
    else:
        limits = [(f"ua:{name}|{addr}", LOGIN_MAX_PER_USER_ADDR), (f"u:{name}", LOGIN_MAX_PER_USER),
                  (f"a:{addr}", LOGIN_MAX_PER_ADDR)]
        clear = [limits[0][0]]
    at, wait = db.reserve_attempt(limits, LOGIN_WINDOW)
    if wait is not None:
        raise E.throttled(wait)
    return Attempt(db, [k for k, _ in limits], at, clear)


def registration(db: MetadataStore, addr: str, per_hour: int) -> None:
    """Count one registration from ``addr`` (429 when over ``per_hour``)."""
    _at, wait = db.reserve_attempt([(f"r:{addr}", per_hour)], REGISTRATION_WINDOW)
    if wait is not None:
        raise E.throttled(wait, "too many registrations from this address")
