"""Accounts: registration, KDF lookup, login/logout, password and master keys."""
from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response

from .. import errors as E
from .. import throttle
from ..admin import invite_hash
from ..auth import (CurrentUser, decoy_kdf, device_secret_hash, hash_auth_key, issue_token,
                    new_device_credential, parse_device_credential, verify_auth_key)
from ..config import Settings
from ..db import MetadataStore, UserRecord
from ..deps import get_db, get_settings, get_store
from ..models import (AccountResponse, Error, KdfCheckRequest, KdfLookupResponse, LoginRequest,
                      NewMasterKeyRequest, PasswordChangeRequest, ReauthRequest, RegisterRequest,
                      RegisterResponse, TokenResponse, Username)
from ..storage import BlobStore
from .common import client_addr as _client_addr

router = APIRouter(tags=["accounts"], responses={422: {"model": Error}})

SettingsDep = Annotated[Settings, Depends(get_settings)]
DbDep = Annotated[MetadataStore, Depends(get_db)]
StoreDep = Annotated[BlobStore, Depends(get_store)]


@router.get("/auth/kdf", response_model=KdfLookupResponse)
def kdf_lookup(username: Annotated[Username, Query()], db: DbDep, settings: SettingsDep):
    user = db.get_user_by_name(username)
    if user is not None:
        return KdfLookupResponse(kdf=user.kdf)
    return KdfLookupResponse(kdf=decoy_kdf(settings, username.lower(), db.decoy_template()))


@router.post("/users", status_code=201, response_model=RegisterResponse,
             responses={403: {"model": Error}, 409: {"model": Error}, 429: {"model": Error}})
def register(body: RegisterRequest, request: Request, db: DbDep, settings: SettingsDep):
    """Open to anyone, to holders of an invite (``python -m server users add-invite``)
    or closed, as the server is configured; throttled per address either way."""
    if settings.registration == "closed":
        raise E.forbidden("registration is closed on this server")
    if settings.registration == "invite" and not body.invite:
        raise E.forbidden("registration needs an invite on this server")
    if body.master_key.gen != 1:
        raise E.invalid("the first master key generation must be 1")
    throttle.registration(db, _client_addr(request), settings.registrations_per_hour)
    user_id = uuid.uuid4()
    db.create_user(user_id, body.username, hash_auth_key(body.auth_key), body.kdf,
                   body.master_key, body.root_inode, body.root_meta,
                   invite_hash=invite_hash(body.invite) if settings.registration == "invite" else None)
    return RegisterResponse(user_id=user_id)


@router.post("/auth/login", response_model=TokenResponse,
             responses={401: {"model": Error}, 429: {"model": Error}})
def login(body: LoginRequest, request: Request, db: DbDep, settings: SettingsDep):
    """A token for a new device (its credential in ``device``), or for the device
    whose credential the request carries."""
    user = db.get_user_by_name(body.username)
    device = parse_device_credential(body.device)
    if device is not None and (user is None or not db.device_of(user.id, device[0], device_secret_hash(device[1]))):
        device = None
    attempt = throttle.attempt(db, body.username, _client_addr(request), device[0] if device else None)
    ok = verify_auth_key(body.auth_key, user.auth_hash if user else None)
    if not ok or user is None:
        raise E.bad_credentials()
    attempt.succeeded()
    if device is not None:
        return issue_token(settings, user.id, user.token_version, device[0])
    secret, secret_hash = new_device_credential()
    did = db.add_device(user.id, secret_hash)
    return issue_token(settings, user.id, user.token_version, did, f"{did}.{secret}")


@router.post("/auth/logout", status_code=204, responses={401: {"model": Error}})
def logout(user: CurrentUser, request: Request, db: DbDep,
           all_devices: Annotated[bool, Query(alias="all")] = False):
    """Ends this device's session; ``?all=true`` ends every device's."""
    if all_devices:
        db.revoke_all_devices(user.id)
    else:
        db.revoke_device(user.id, request.state.device)
    return Response(status_code=204)


def _prove(user: UserRecord, auth_key: str, request: Request, db: MetadataStore) -> None:
    """A fresh proof of the password-derived key (throttled like a login)."""
    attempt = throttle.attempt(db, user.username, _client_addr(request), request.state.device)
    if not verify_auth_key(auth_key, user.auth_hash):
        raise E.bad_credentials()
    attempt.succeeded()


@router.get("/account", response_model=AccountResponse, responses={401: {"model": Error}})
def account(user: CurrentUser, db: DbDep):
    return AccountResponse(user_id=user.id, username=user.username, kdf=user.kdf,
                           current_gen=user.current_gen, master_keys=db.master_keys(user.id),
                           root_inode=user.root_inode, identity=db.identity(user.id))


@router.put("/account/password", response_model=TokenResponse,
            responses={401: {"model": Error}, 400: {"model": Error}, 429: {"model": Error}})
def change_password(body: PasswordChangeRequest, request: Request, user: CurrentUser,
                    db: DbDep, settings: SettingsDep):
    """Returns 200 with a fresh token (the old ones stop working)."""
    _prove(user, body.current_auth_key, request, db)
    tv = db.change_password(user.id, hash_auth_key(body.new_auth_key), body.new_kdf, body.master_keys)
    return issue_token(settings, user.id, tv, request.state.device)


@router.put("/account/kdf", status_code=204,
            responses={401: {"model": Error}, 409: {"model": Error}})
def add_kdf_check(body: KdfCheckRequest, user: CurrentUser, db: DbDep):
    """Adds the check to the parameters of an account from before checks: the
    parameters themselves cannot change here (that is a password change)."""
    if body.kdf.model_dump(exclude={"check"}) != user.kdf.model_dump(exclude={"check"}):
        raise E.conflict("these are not the account's KDF parameters")
    db.set_kdf(user.id, body.kdf)
    return Response(status_code=204)


@router.post("/account/master-keys", status_code=204,
             responses={401: {"model": Error}, 409: {"model": Error}, 429: {"model": Error}})
def new_master_key(body: NewMasterKeyRequest, request: Request, user: CurrentUser, db: DbDep):
    _prove(user, body.auth_key, request, db)
    db.add_master_key(user.id, body.master_key)
    return Response(status_code=204)


@router.delete("/account/master-keys/{gen}", status_code=204,
               responses={401: {"model": Error}, 404: {"model": Error}, 409: {"model": Error},
                          429: {"model": Error}})
def delete_master_key(gen: Annotated[int, Path(ge=1, le=2**31)], body: ReauthRequest, request: Request,
                      user: CurrentUser, db: DbDep):
    _prove(user, body.auth_key, request, db)
    db.delete_master_key(user.id, gen)
    return Response(status_code=204)


@router.delete("/account", status_code=204, responses={401: {"model": Error}, 429: {"model": Error}})
def delete_account(body: ReauthRequest, request: Request, user: CurrentUser, db: DbDep, store: StoreDep):
    _prove(user, body.auth_key, request, db)
    db.delete_user(user.id)
    store.delete_user(user.id)
    return Response(status_code=204)
