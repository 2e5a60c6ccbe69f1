"""Links for anyone: make one (``client.py link``), list and revoke them, and open one
with no account (``client.py fetch``). The format is zkfs/linkformat.py (FORMAT.md §8).

A link serves the version of the file it was made of, exactly: its record names that
version's manifest by digest, and the server keeps that version's chunks for it. The
fetcher believes nothing the server says: the record must open under the URL's secret,
the manifest must have the digest the record names and open under the file key, every
chunk segment must pass its HMAC and name its chunk and position (FORMAT.md §3)."""
from __future__ import annotations

import binascii
import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .api import ApiClient
from .crypto import BinaryFernet, IntegrityError
from .errors import ServerError, TamperedError, ZkfsError
from .format import Manifest, b64decode, b64encode, open_chunk
from .linkformat import (
    LinkedFile,
    LinkUrl,
    LockedRecord,
    link_id_text,
    new_link,
    open_note,
    open_record,
    parse_link_id,
    seal_note,
    seal_record,
    split_link_url,
    unlock_record,
)
from .transfer import IN_FLIGHT, check_download_target, ordered, save_atomically
from .vault import Node, Vault, split_path

# ---------------------------------------------------------------- the owner's side


def create(vault: Vault, node: Node, path: str, *, expires_in: int | None = None,
           password: str | None = None) -> LinkUrl:
    """A link to ``node``, the file at ``path``, as it is now."""
    if not node.attrs.is_reg:
        raise ZkfsError(f"{path}: only a file can be linked (not a folder, symlink or device)")
    parts = split_path(path)
    link_id, secret = new_link()
    file = LinkedFile(name=parts[-1], size=node.attrs.size, inode=node.id,
                      key=vault.file_key(node.id, node.attrs.key_id),
                      manifest=node.attrs.manifest_digest, mtime_ns=node.attrs.mtime_ns)
    body = {"id": link_id_text(link_id), "inode": str(node.id), "version": node.version,
            "record": b64encode(seal_record(secret, link_id, file, password)),
            "note": b64encode(seal_note(vault.ns, link_id, secret, "/" + "/".join(parts))),
            "expires_in": expires_in}
    try:
        vault.api.create_link(body)
    except ServerError as exc:
        if exc.code == "conflict":
            raise ZkfsError(f"{path} changed on the server while the link was being made; "
                            "run the command again") from None
        raise
    return LinkUrl(vault.api.base_url, link_id, secret)


@dataclass(frozen=True)
class LinkInfo:
    id: str
    path: str | None          # None: its note does not open (sealed under a retired key)
    url: str | None
    size: int
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    active: bool


def listing(vault: Vault) -> list[LinkInfo]:
    """The account's links, with the path and URL their notes hold."""
    out = []
    for d in vault.api.list_links():
        path = url = None
        link_id = parse_link_id(d["id"])
        for ns in vault.keyring.readers if d.get("note") else ():
            try:
                secret, path = open_note(ns, link_id, b64decode(d["note"]))
                url = str(LinkUrl(vault.api.base_url, link_id, secret))
                break
            except (IntegrityError, ValueError):
                continue
        out.append(LinkInfo(d["id"], path, url, d["size"], d["created_at"], d["expires_at"], d["revoked_at"],
                            d["active"]))
    return out


def link_id_of(text: str) -> str:
    """The id of ``text``: a link's URL or its id."""
    if "/s/" in text:
        try:
            return link_id_text(split_link_url(text)[1])
        except ValueError as exc:
            raise ZkfsError(str(exc)) from None
    try:
        return link_id_text(parse_link_id(text))
    except ValueError as exc:
        raise ZkfsError(f"{exc}: give the link's URL or its id (as `link --list` shows)") from None


# ---------------------------------------------------------------- anyone's side
def open_link(api: ApiClient, url: LinkUrl, password: Callable[[], str]) -> LinkedFile:
    """The file a link opens, from its record (``password()`` asked only if it has one)."""
    token = _record(api, url)
    try:
        opened = open_record(url.secret, url.link_id, token)
    except IntegrityError:
        raise TamperedError("the link does not open: its key is wrong (a link cut short or mistyped?), "
                            "or the server altered its record") from None
    if isinstance(opened, LockedRecord):
        weak = opened.kdf.weakness()
        if weak:
            raise TamperedError(f"the link asks for Argon2id with {weak}, outside what this client accepts")
        try:
            return unlock_record(url.secret, url.link_id, opened, password())
        except IntegrityError:
            raise ZkfsError("wrong password for this link") from None
    return opened


def fetch(url: LinkUrl, output: Path | None, password: Callable[[], str], *, insecure_http: bool = False,
          progress: Callable[[LinkedFile], Callable[[int], None] | None] | None = None) -> tuple[Path, str]:
    """Download what ``url`` links to (``output``: a file, a folder, or None for the
    current folder under the linked name), through a temp file renamed at the end.
    Returns where it went and its sha256."""
    api = ApiClient(url.server, insecure_http=insecure_http)
    try:
        file = open_link(api, url, password)
        # The name is the link maker's: it may replace a file only if the fetcher named it.
        named = output is not None and not output.is_dir()
        dest = output if named else (output or Path(".")) / file.name
        check_download_target(dest, replace=named)
        cipher = BinaryFernet(file.key)
        manifest = _manifest(api, url, file, cipher)
        track = progress(file) if progress else None

        def chunk(i: int) -> bytes:
            ref = manifest.chunks[i]
            if ref.is_hole:
                return bytes(manifest.chunk_length(i))
            try:
                return open_chunk(cipher, _get(api, url, f"blobs/{ref.blob_id}"), ref, manifest.chunk_length(i))
            except IntegrityError as exc:
                raise TamperedError(f"chunk {i} of the linked file failed verification: {exc}") from None

        umask = os.umask(0)
        os.umask(umask)
        with ThreadPoolExecutor(IN_FLIGHT) as pool:
            jobs = (lambda i=i: chunk(i) for i in range(len(manifest.chunks)))
            sha = save_atomically(dest, ordered(pool, jobs, IN_FLIGHT * 2), 0o666 & ~umask,
                                  (file.mtime_ns, file.mtime_ns), track, replace=named)
        return dest, sha
    finally:
        api.close()


def _manifest(api: ApiClient, url: LinkUrl, file: LinkedFile, cipher: BinaryFernet) -> Manifest:
    if file.manifest is None:
        return Manifest(inode=file.inode)
    token = _get(api, url, "manifest")
    if hashlib.sha256(token).digest() != file.manifest:
        raise TamperedError("the server sent another manifest than the one the link names")
    try:
        manifest = Manifest.decrypt(cipher, token, file.inode)
    except IntegrityError as exc:
        raise TamperedError(f"the linked file's manifest failed verification: {exc}") from None
    if manifest.size != file.size:
        raise TamperedError("the linked file's manifest disagrees with its record about its size")
    return manifest


def _record(api: ApiClient, url: LinkUrl) -> bytes:
    try:
        doc = json.loads(_get(api, url, "record"))
        return b64decode(doc["record"])
    except (ValueError, TypeError, KeyError, binascii.Error):
        raise TamperedError("the server's answer for the link's record is malformed") from None


def _get(api: ApiClient, url: LinkUrl, part: str) -> bytes:
    try:
        return api.link_get(link_id_text(url.link_id), part)
    except ServerError as exc:
        if exc.code == "gone":
            raise ZkfsError("this link has expired or was revoked") from None
        if exc.code == "not_found" and part == "record":
            raise ZkfsError("there is no such link on this server") from None
        if exc.code == "throttled":
            raise ZkfsError("the server refuses more requests for links from this address for now; "
                            "try again later") from None
        raise
