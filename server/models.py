"""Pydantic models: the complete wire contract of /api/v1 (so /docs is exact).

Binary values travel as standard base64 strings (``B64`` fields). Every id is a
UUID; name hashes are 64 lowercase hex chars (HMAC-SHA256, computed by the
client). The server never interprets any encrypted field.
"""
from __future__ import annotations

import base64
from typing import Annotated, Literal, Union
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Limits on client-supplied sizes (base64 text lengths).
MAX_META_B64 = 256 * 1024          # encrypted inode attributes incl. xattrs
MAX_NAME_B64 = 1024                # encrypted dentry name (255-byte name + overhead)
MAX_KEY_B64 = 512                  # a wrapped key
MAX_MANIFEST_B64 = 8 * 1024 * 1024  # the manifest of a ~380 GiB file at 1 MiB chunks
MAX_INLINE_B64 = 2 * 1024 * 1024   # inline blob data carried in one ops request
MAX_OPS = 1000
MAX_LISTINGS = 256             # directories per POST /fs/listings

B64 = Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]*={0,2}$")]
NameHash = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Username = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Error(BaseModel):
    """Every error body. ``code`` is machine-readable (see docs/API.md)."""
    detail: str
    code: str
    op_index: int | None = None     # POST /fs/ops: the index of the op that failed


# ---------------------------------------------------------------- accounts
KdfCheck = Annotated[B64, Field(min_length=44, max_length=44)]     # HMAC-SHA256


class KdfParams(Strict):
    """An account's Argon2id parameters as stored and served. ``check``: the
    client's MAC over them under a key derived from the password (docs/FORMAT.md
    §2); absent only for accounts from before it, until their next login."""
    alg: Literal["argon2id"] = "argon2id"
    salt: Annotated[B64, Field(max_length=88)]
    memory_kib: int = Field(ge=8, le=4 * 1024 * 1024)
    iterations: int = Field(ge=1, le=64)
    lanes: int = Field(ge=1, le=64)
    check: KdfCheck | None = None


# The floor for new parameters (registration, password change): the same as the
# client's (zkfs/crypto.py), so no account is made cheaper to guess than it accepts.
KDF_MIN_MEMORY_KIB, KDF_MIN_ITERATIONS, KDF_MIN_SALT, KDF_MAX_SALT, KDF_MAX_LANES = 65536, 3, 16, 64, 16


class NewKdfParams(KdfParams):
    memory_kib: int = Field(ge=KDF_MIN_MEMORY_KIB, le=4 * 1024 * 1024)
    iterations: int = Field(ge=KDF_MIN_ITERATIONS, le=64)
    lanes: int = Field(ge=1, le=KDF_MAX_LANES)
    check: KdfCheck

    @field_validator("salt")
    @classmethod
    def _salt_length(cls, v: str) -> str:
        try:
            n = len(base64.b64decode(v, validate=True))
        except ValueError:
            raise ValueError("salt is not base64") from None
        if not KDF_MIN_SALT <= n <= KDF_MAX_SALT:
            raise ValueError(f"salt must be {KDF_MIN_SALT} to {KDF_MAX_SALT} bytes")
        return v


class MasterKeyRecord(Strict):
    """One generation of the master key: wrapped by the password KEK, plus the
    namespace key wrapped by this master key."""
    gen: int = Field(ge=1, le=2**31)
    wrapped_master: Annotated[B64, Field(max_length=MAX_KEY_B64)]
    wrapped_namespace: Annotated[B64, Field(max_length=MAX_KEY_B64)]


AuthKey = Annotated[B64, Field(min_length=40, max_length=128)]
DeviceCredential = Annotated[str, Field(max_length=128, pattern=r"^[0-9a-f-]{36}\.[A-Za-z0-9_-]+$")]


class RegisterRequest(Strict):
    username: Username
    auth_key: AuthKey
    invite: Annotated[str, Field(max_length=64)] | None = None   # --registration invite
    kdf: NewKdfParams
    master_key: MasterKeyRecord
    root_inode: UUID
    root_meta: Annotated[B64, Field(max_length=MAX_META_B64)]


class RegisterResponse(BaseModel):
    user_id: UUID


class KdfLookupResponse(BaseModel):
    """Salt and parameters for a username. Unknown names get a stable decoy so
    this endpoint does not reveal whether an account exists."""
    kdf: KdfParams


class LoginRequest(Strict):
    username: Username
    auth_key: AuthKey
    # From an earlier login on this device: exempts it from the per-account throttles
    # (others guessing at the account never lock its own devices out).
    device: DeviceCredential | None = None


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int
    user_id: UUID
    device: str | None = None       # a new device's credential: keep it, send it with logins


class ReauthRequest(Strict):
    """A fresh proof of the password-derived key, for destructive operations
    (a bearer token alone does not delete an account)."""
    auth_key: AuthKey


class IdentityRecord(Strict):
    """The account's X25519 key pair for sharing: the public half (published by
    username), the private half wrapped under master key generation ``gen``."""
    public_key: Annotated[B64, Field(min_length=44, max_length=44)]
    wrapped_private: Annotated[B64, Field(max_length=MAX_KEY_B64)]
    gen: int = Field(ge=1, le=2**31)


class AccountResponse(BaseModel):
    user_id: UUID
    username: str
    kdf: KdfParams
    current_gen: int
    master_keys: list[MasterKeyRecord]
    root_inode: UUID
    identity: IdentityRecord | None = None     # None until the account's next login makes one


class PasswordChangeRequest(Strict):
    current_auth_key: AuthKey
    new_auth_key: AuthKey
    new_kdf: NewKdfParams
    # Every generation re-wrapped under the new KEK (same gens as stored).
    master_keys: list[MasterKeyRecord] = Field(max_length=64)


class KdfCheckRequest(Strict):
    kdf: NewKdfParams             # the stored parameters, now with their check


class NewMasterKeyRequest(Strict):
    master_key: MasterKeyRecord   # gen must be current_gen + 1; becomes current
    auth_key: AuthKey             # fresh proof of the password-derived key


class KeyUpdate(Strict):
    inode: UUID
    gen: int = Field(ge=1, le=2**31)
    wrapped_key: Annotated[B64, Field(max_length=MAX_KEY_B64)]


class KeyBatchRequest(Strict):
    keys: list[KeyUpdate] = Field(max_length=MAX_OPS)


class WrappedKeyResponse(BaseModel):
    inode: UUID
    gen: int
    wrapped_key: str
    share: UUID | None = None       # wrapped under this shared folder's key generation (None: the account's)


class KeyListResponse(BaseModel):
    keys: list[WrappedKeyResponse]


# ---------------------------------------------------------------- namespace
class InodeOut(BaseModel):
    id: UUID
    is_dir: bool
    version: int
    nlink: int
    meta: str                       # B64 encrypted attributes
    manifest: str | None = None     # B64, only from GET /fs/inodes/{id}


class EntryOut(BaseModel):
    name_hash: str
    name: str                       # B64 encrypted name
    inode: InodeOut


class EntryList(BaseModel):
    dir: InodeOut                   # the directory itself, from the same snapshot
    entries: list[EntryOut]


class ListingsRequest(Strict):
    dirs: list[UUID] = Field(min_length=1, max_length=MAX_LISTINGS)


class DirListing(BaseModel):
    dir: InodeOut                   # the directory itself, from the same snapshot
    entries: list[EntryOut]


class ListingsResponse(BaseModel):
    listings: list[DirListing]


class StatfsResponse(BaseModel):
    quota_bytes: int | None
    used_bytes: int
    free_bytes: int                 # what this account may still store


class ChangesResponse(BaseModel):
    seq: int
    inodes: list[UUID]              # inodes (incl. directories) changed after ?since
    seqs: list[int]                 # for each, the seq of its last change (a client skips its own)
    key_gen: int                    # the account's current master key generation (rotate-key)
    shares_seq: int = 0             # moves whenever a share this account owns or belongs to changes


# Ops: one POST /fs/ops applies a list of these in a single transaction.
class InlineBlob(Strict):
    blob_id: UUID
    data: Annotated[B64, Field(max_length=MAX_INLINE_B64)]


class OpCreate(Strict):
    op: Literal["create"]
    inode: UUID
    is_dir: bool
    meta: Annotated[B64, Field(max_length=MAX_META_B64)]
    parent: UUID
    name_hash: NameHash
    name: Annotated[B64, Field(max_length=MAX_NAME_B64)]
    key_gen: int | None = Field(default=None, ge=1, le=2**31)
    wrapped_key: Annotated[B64, Field(max_length=MAX_KEY_B64)] | None = None


class OpLink(Strict):
    op: Literal["link"]
    inode: UUID
    parent: UUID
    name_hash: NameHash
    name: Annotated[B64, Field(max_length=MAX_NAME_B64)]


class OpUnlink(Strict):
    op: Literal["unlink"]
    parent: UUID
    name_hash: NameHash
    expect_inode: UUID | None = None        # else 409 stale
    keep_orphan: bool = False       # inode kept (nlink 0) until delete_inode


class OpRmdir(Strict):
    op: Literal["rmdir"]
    parent: UUID
    name_hash: NameHash
    expect_inode: UUID | None = None        # else 409 stale


class OpRename(Strict):
    op: Literal["rename"]
    src_parent: UUID
    src_hash: NameHash
    dst_parent: UUID
    dst_hash: NameHash
    dst_name: Annotated[B64, Field(max_length=MAX_NAME_B64)]
    noreplace: bool = False
    keep_orphan: bool = False       # for a replaced target still open
    src_inode: UUID | None = None   # what the source entry must name, else 409 stale
    dst_inode: UUID | None = None   # what an existing target must be, else 409 stale


class OpExchange(Strict):
    """rename(2) with RENAME_EXCHANGE: two existing entries swap inodes."""
    op: Literal["exchange"]
    a_parent: UUID
    a_hash: NameHash
    a_inode: UUID
    a_name: Annotated[B64, Field(max_length=MAX_NAME_B64)]     # the name sealed for b_inode
    b_parent: UUID
    b_hash: NameHash
    b_inode: UUID
    b_name: Annotated[B64, Field(max_length=MAX_NAME_B64)]     # the name sealed for a_inode


class OpSetMeta(Strict):
    op: Literal["setmeta"]
    inode: UUID
    base_version: int
    meta: Annotated[B64, Field(max_length=MAX_META_B64)]


class OpCommit(Strict):
    op: Literal["commit"]
    inode: UUID
    base_version: int
    meta: Annotated[B64, Field(max_length=MAX_META_B64)]
    manifest: Annotated[B64, Field(max_length=MAX_MANIFEST_B64)]
    blobs: list[UUID] = Field(max_length=1_000_000)   # every blob the new manifest references
    inline: list[InlineBlob] = Field(default_factory=list, max_length=64)
    # A new file key for this version (rotate-key --full re-encrypts content under
    # one): replaced in the same transaction as the content it opens.
    key_gen: int | None = Field(default=None, ge=1)
    wrapped_key: Annotated[B64, Field(max_length=MAX_KEY_B64)] | None = None


class OpDeleteInode(Strict):
    op: Literal["delete_inode"]
    inode: UUID


Op = Annotated[
    Union[OpCreate, OpLink, OpUnlink, OpRmdir, OpRename, OpExchange, OpSetMeta, OpCommit, OpDeleteInode],
    Field(discriminator="op"),
]


class OpsRequest(Strict):
    ops: list[Op] = Field(min_length=1, max_length=MAX_OPS)
    # Applied once: the same batch_id again gets the first answer, nothing re-applied.
    batch_id: UUID | None = None


class OpResult(BaseModel):
    inode: UUID | None = None
    version: int | None = None


class OpsResponse(BaseModel):
    seq: int
    results: list[OpResult]


# ---------------------------------------------------------------- blobs
class BlobRef(Strict):
    inode: UUID
    blob_id: UUID


class BlobUpload(BlobRef):
    size: int = Field(ge=0, le=2**40)


class UploadUrlsRequest(Strict):
    blobs: list[BlobUpload] = Field(min_length=1, max_length=MAX_LISTINGS)


class DownloadUrlsRequest(Strict):
    blobs: list[BlobRef] = Field(min_length=1, max_length=MAX_LISTINGS)


class BlobUrl(BaseModel):
    inode: UUID
    blob_id: UUID
    url: str


class BlobUrlsResponse(BaseModel):
    """Upload: PUT exactly the blob's declared size to its URL (no other header
    needed). Download: GET (a ``Range`` is honoured); blobs the user does not have
    are left out. Valid ``expires_in`` seconds."""
    urls: list[BlobUrl]
    expires_in: int


# ---------------------------------------------------------------- links for anyone
# docs/FORMAT.md §8: the record and note are the client's ciphertext; the server keeps
# them with a copy of the linked version's manifest and chunks.
MAX_LINK_RECORD_B64 = 8 * 1024
MAX_LINK_NOTE_B64 = 8 * 1024           # a path of up to PATH_MAX
MAX_LINK_SECONDS = 10 * 365 * 86400
LinkId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{22}$")]     # 16 bytes, base64url


class LinkCreateRequest(Strict):
    id: LinkId                      # chosen by the client: its key derivation binds it
    inode: UUID
    version: int = Field(ge=1)      # the file's current version: the one the link serves
    record: Annotated[B64, Field(min_length=1, max_length=MAX_LINK_RECORD_B64)]
    note: Annotated[B64, Field(max_length=MAX_LINK_NOTE_B64)]
    expires_in: int | None = Field(default=None, ge=1, le=MAX_LINK_SECONDS)     # seconds; None: never


class LinkOut(BaseModel):
    id: str
    inode: UUID
    version: int
    size: int                       # bytes it keeps on the server (charged to the owner)
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    active: bool                    # answers anyone with its URL now
    note: str | None                # B64, the owner's sealed note


class LinkListResponse(BaseModel):
    links: list[LinkOut]


class LinkRecordResponse(BaseModel):
    record: str                     # B64 sealed record


# ---------------------------------------------------------------- sharing
# A share's key generation is a 32-byte secret, wrapped ("granted") for the owner and
# each member under a key only the owner's and that member's identity keys compute
# (docs/FORMAT.md "Shared folders"). The server stores the grants and enforces who may read and write.
Wrapped = Annotated[B64, Field(max_length=MAX_KEY_B64)]
# The owner's MAC of a share's generation and member list (HMAC-SHA256): the owner's
# client grants a new generation only to members it listed itself.
MembersSeal = Annotated[B64, Field(min_length=44, max_length=44)]


class PublicKeyResponse(BaseModel):
    username: str
    public_key: str


class Grant(Strict):
    gen: int = Field(ge=1, le=2**31)
    wrapped: Wrapped


class UserGrant(Strict):
    username: Username
    wrapped: Wrapped


class NewShareRequest(Strict):
    """Makes ``root_inode`` (a folder of the owner's, not in a share and with none
    inside) a shared folder: its subtree is tagged with the share, which stays
    ``converting`` (invisible to members) until the owner has re-sealed it."""
    id: UUID
    root_inode: UUID
    name: Annotated[B64, Field(max_length=MAX_NAME_B64)]     # sealed under generation 1
    grant: Wrapped                                           # generation 1, for the owner
    members_seal: MembersSeal                                # generation 1, no members


class NewMemberRequest(Strict):
    username: Username
    read_only: bool = False
    grants: list[Grant] = Field(min_length=1, max_length=MAX_OPS)   # one per generation
    members_seal: MembersSeal                                # of the members with this one
    expect_members: list[Username] = Field(max_length=MAX_OPS)   # the members the seal's list adds to


class NewGenerationRequest(Strict):
    """A new key generation (``gen`` = current + 1), granted to the owner and every
    remaining member; ``remove``: a member removed in the same transaction (unshare).
    The share is ``rotating`` until the owner has re-sealed it."""
    gen: int = Field(ge=2, le=2**31)
    name: Annotated[B64, Field(max_length=MAX_NAME_B64)]     # re-sealed under the new generation
    grants: list[UserGrant] = Field(min_length=1, max_length=MAX_OPS)
    remove: Username | None = None
    members_seal: MembersSeal                                # of the new generation and the members left


class ShareStateRequest(Strict):
    state: Literal["ready"]


class ShareMemberOut(BaseModel):
    username: str
    public_key: str
    read_only: bool


class ShareOut(BaseModel):
    id: UUID
    owner: str
    owner_public_key: str
    root_inode: UUID
    name: str                           # B64, sealed under the current generation
    state: Literal["converting", "rotating", "ready"]
    current_gen: int
    gens: list[int]
    read_only: bool                     # for the requesting user
    grants: list[Grant]                 # the requesting user's, one per generation
    members: list[ShareMemberOut]       # the owner sees them; members see an empty list
    members_seal: str | None            # the owner's MAC of current_gen and members (the owner's view only)


class SharesResponse(BaseModel):
    shares: list[ShareOut]


# ---------------------------------------------------------------- misc
class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
