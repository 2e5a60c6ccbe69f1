"""Shared folders: identity keys published by username, shares, their members and
their key generations (docs/API.md "Shares"). Every key here is opaque: wrapped
by clients for clients; the server only decides who may read and write."""
from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Path, Response

from .. import errors as E
from ..auth import CurrentUser
from ..models import (Error, IdentityRecord, NewGenerationRequest, NewMemberRequest, NewShareRequest,
                      PublicKeyResponse, SharesResponse, ShareStateRequest, Username)
from .common import DbDep

router = APIRouter(tags=["shares"], responses={401: {"model": Error}, 404: {"model": Error},
                                               422: {"model": Error}})


@router.put("/account/identity", status_code=204, responses={409: {"model": Error}})
def set_identity(body: IdentityRecord, user: CurrentUser, db: DbDep):
    """The account's identity key: stored once, then only re-wrapped (rotate-key)."""
    db.set_identity(user.id, body)
    return Response(status_code=204)


@router.get("/users/{username}/public-key", response_model=PublicKeyResponse)
def public_key(username: Annotated[Username, Path()], user: CurrentUser, db: DbDep):
    """Another account's public identity key (clients pin it on first use)."""
    found = db.public_key(username)
    if found is None:
        raise E.not_found("no such user, or no public key yet (it is made at the user's next login)")
    return PublicKeyResponse(username=found[0], public_key=found[1])


@router.get("/shares", response_model=SharesResponse)
def list_shares(user: CurrentUser, db: DbDep):
    """The shares the user owns, and those it is a member of, with its grants."""
    return SharesResponse(shares=db.shares_of(user.id))


@router.post("/shares", status_code=201, responses={409: {"model": Error}})
def create_share(body: NewShareRequest, user: CurrentUser, db: DbDep):
    db.create_share(user.id, body.id, body.root_inode, body.name, body.grant, body.members_seal)
    return Response(status_code=201)


@router.put("/shares/{share}/state", status_code=204)
def set_state(share: UUID, body: ShareStateRequest, user: CurrentUser, db: DbDep):
    """``ready``: the owner re-sealed everything under the current generation."""
    db.set_share_ready(user.id, share)
    return Response(status_code=204)


@router.post("/shares/{share}/members", status_code=201, responses={409: {"model": Error}})
def add_member(share: UUID, body: NewMemberRequest, user: CurrentUser, db: DbDep):
    db.add_member(user.id, share, body)
    return Response(status_code=201)


@router.post("/shares/{share}/generations", status_code=201, responses={409: {"model": Error}})
def new_generation(share: UUID, body: NewGenerationRequest, user: CurrentUser, db: DbDep):
    """A new key generation; with ``remove``, a member removed in the same transaction:
    from then on the server refuses every request of theirs into the share."""
    db.new_share_generation(user.id, share, body)
    return Response(status_code=201)


@router.delete("/shares/{share}/generations/{gen}", status_code=204, responses={409: {"model": Error}})
def drop_generation(share: UUID, gen: Annotated[int, Path(ge=1, le=2**31)], user: CurrentUser, db: DbDep):
    db.drop_share_generation(user.id, share, gen)
    return Response(status_code=204)
