"""Accounts: registration, KDF lookup, login/logout, password and master keys."""
from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response

from .. import errors as E
from ..auth import CurrentUser, decoy_kdf, hash_auth_key, issue_token, verify_auth_key
from ..config import LOGIN_MAX_PER_ADDR, LOGIN_MAX_PER_USER, LOGIN_WINDOW, Settings
from ..db import MetadataStore
from ..deps import get_db, get_settings, get_store
from ..models import (AccountResponse, Error, KdfCheckRequest, KdfLookupResponse, LoginRequest,
                      NewMasterKeyRequest,
                      PasswordChangeRequest, RegisterRequest, RegisterResponse, TokenResponse,
                      Username)
from ..storage import BlobStore

router = APIRouter(tags=["accounts"], responses={422: {"model": Error}})

SettingsDep = Annotated[Settings, Depends(get_settings)]
DbDep = Annotated[MetadataStore, Depends(get_db)]
StoreDep = Annotated[BlobStore, Depends(get_store)]


@router.get("/auth/kdf", response_model=KdfLookupResponse)
def kdf_lookup(username: Annotated[Username, Query()], db: DbDep, settings: SettingsDep):
    user = db.get_user_by_name(username)
    if user is not None:
        return KdfLookupResponse(kdf=user.kdf)
    return KdfLookupResponse(kdf=decoy_kdf(settings, username, db.decoy_template()))


@router.post("/users", status_code=201, response_model=RegisterResponse,
             responses={409: {"model": Error}})
def register(body: RegisterRequest, db: DbDep):
    if body.master_key.gen != 1:
        raise E.invalid("the first master key generation must be 1")
    user_id = uuid.uuid4()
    db.create_user(user_id, body.username, hash_auth_key(body.auth_key), body.kdf,
                   body.master_key, body.root_inode, body.root_meta)
    return RegisterResponse(user_id=user_id)


def _client_addr(request: Request) -> str:
    return request.client.host if request.client else "unknown"


@router.post("/auth/login", response_model=TokenResponse,
             responses={401: {"model": Error}, 429: {"model": Error}})
def login(body: LoginRequest, request: Request, db: DbDep, settings: SettingsDep):
    user_key, addr_key = "u:" + body.username, "a:" + _client_addr(request)
    retry = db.throttle_retry_after([(user_key, LOGIN_MAX_PER_USER), (addr_key, LOGIN_MAX_PER_ADDR)],
                                    LOGIN_WINDOW)
    if retry is not None:
        raise E.throttled(retry)
    user = db.get_user_by_name(body.username)
    ok = verify_auth_key(body.auth_key, user.auth_hash if user else None)
    if not ok or user is None:
        db.record_login_failure([user_key, addr_key], LOGIN_WINDOW)
        raise E.bad_credentials()
    db.clear_login_failures(user_key)
    return issue_token(settings, user.id, user.token_version)


@router.post("/auth/logout", status_code=204, responses={401: {"model": Error}})
def logout(user: CurrentUser, db: DbDep):
    db.bump_token_version(user.id)
    return Response(status_code=204)


@router.get("/account", response_model=AccountResponse, responses={401: {"model": Error}})
def account(user: CurrentUser, db: DbDep):
    return AccountResponse(user_id=user.id, username=user.username, kdf=user.kdf,
                           current_gen=user.current_gen, master_keys=db.master_keys(user.id),
                           root_inode=user.root_inode)


@router.put("/account/password", response_model=TokenResponse,
            responses={401: {"model": Error}, 400: {"model": Error}, 429: {"model": Error}})
def change_password(body: PasswordChangeRequest, request: Request, user: CurrentUser,
                    db: DbDep, settings: SettingsDep):
    """Returns 200 with a fresh token (the old ones stop working)."""
    user_key, addr_key = "u:" + user.username, "a:" + _client_addr(request)
    retry = db.throttle_retry_after([(user_key, LOGIN_MAX_PER_USER), (addr_key, LOGIN_MAX_PER_ADDR)],
                                    LOGIN_WINDOW)
    if retry is not None:
        raise E.throttled(retry)
    if not verify_auth_key(body.current_auth_key, user.auth_hash):
        db.record_login_failure([user_key, addr_key], LOGIN_WINDOW)
        raise E.bad_credentials()
    tv = db.change_password(user.id, hash_auth_key(body.new_auth_key), body.new_kdf, body.master_keys)
    return issue_token(settings, user.id, tv)


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
             responses={401: {"model": Error}, 409: {"model": Error}})
def new_master_key(body: NewMasterKeyRequest, user: CurrentUser, db: DbDep):
    db.add_master_key(user.id, body.master_key)
    return Response(status_code=204)


@router.delete("/account/master-keys/{gen}", status_code=204,
               responses={401: {"model": Error}, 404: {"model": Error}, 409: {"model": Error}})
def delete_master_key(gen: Annotated[int, Path(ge=1, le=2**31)], user: CurrentUser, db: DbDep):
    db.delete_master_key(user.id, gen)
    return Response(status_code=204)


@router.delete("/account", status_code=204, responses={401: {"model": Error}})
def delete_account(user: CurrentUser, db: DbDep, store: StoreDep):
    db.delete_user(user.id)
    store.delete_user(user.id)
    return Response(status_code=204)
