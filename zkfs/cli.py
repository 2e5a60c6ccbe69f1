"""`client.py`: the zkfs command line. Every error is one line on stderr and a
non-zero exit status; nothing is ever printed as a traceback."""
from __future__ import annotations

import argparse
import getpass
import logging
import os
import re
import signal
import stat
import sys
import time
import warnings
from pathlib import Path
from uuid import UUID, uuid4

from . import account, links, rotation, sharing
from .api import ApiClient
from .crypto import PasswordKeys, fingerprint
from .errors import CorruptState, NotRegularFile, ServerError, ZkfsError
from .format import MAX_NAME_BYTES, NameTooLong, b64decode, encode_name
from .linkformat import LinkUrl, parse_duration
from .session import open_vault
from .sharekeys import Pins
from .state import LocalState, VersionLedger
from .transfer import (BatchPublisher, check_download_target, download_file, file_sha256, kind_of,
                       prepare_upload, upload_file)
from .vault import Node, Vault, new_attrs, split_path


# ---------------------------------------------------------------- passwords
def read_password(args, prompt: str = "Password: ", *, confirm: bool = False) -> str:
    if getattr(args, "password", None):
        return args.password
    if args.password_stdin:
        return _stdin_line()
    pw = _ask(prompt)
    if confirm and _ask("Repeat password: ") != pw:
        raise ZkfsError("passwords do not match")
    return pw


def _ask(prompt: str) -> str:
    """A password typed at the terminal. Without one, getpass would warn and read
    stdin (an EOFError when empty): refuse instead, naming the way that works."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", getpass.GetPassWarning)
        try:
            return getpass.getpass(prompt)
        except (getpass.GetPassWarning, EOFError):
            raise ZkfsError("no password given: use --password-stdin or run this in a terminal") from None


def _stdin_line() -> str:
    line = sys.stdin.readline()
    if not line:
        raise ZkfsError("expected a password on standard input")
    return line.rstrip("\r\n")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _check_password(pw: str) -> str:
    if len(pw) < 8:
        raise ZkfsError("password must be at least 8 characters")
    return pw


def _progress(total: int, desc: str):
    from tqdm import tqdm     # imported here: a third of the CLI's start-up otherwise
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
               disable=None, leave=False, file=sys.stderr)
    return bar


# ---------------------------------------------------------------- commands
_USERNAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


def _check_username(name: str) -> str:
    if not _USERNAME.fullmatch(name):
        raise ZkfsError("a username is 1 to 64 letters, digits or _ . @ - characters")
    return name


def cmd_register(args, state: LocalState) -> None:
    _check_username(args.username)
    password = _check_password(read_password(args, confirm=True))
    api = ApiClient(args.server or state.saved_server(), insecure_http=args.insecure_http)
    try:
        account.register(api, args.username, password)
    except ServerError as exc:
        raise _not_a_server(api, exc) from None
    print(f"registered {args.username}")
    _login(api, state, args.username, password, args.insecure_http)


def cmd_login(args, state: LocalState) -> None:
    _check_username(args.username)
    api = ApiClient(args.server or state.saved_server(), insecure_http=args.insecure_http)
    _login(api, state, args.username, read_password(args), args.insecure_http)


def _not_a_server(api: ApiClient, exc: ServerError) -> ZkfsError:
    """The account endpoints answer 404 only where there is no zkfs API (a wrong URL)."""
    if exc.status == 404:
        return ZkfsError(f"{api.base_url} is not a zkfs server (HTTP 404 for its API): check --server")
    return exc


def _login(api: ApiClient, state: LocalState, username: str, password: str, insecure_http: bool) -> None:
    """Saves the server with the login, and whether plain http to it was allowed
    (--insecure-http): later commands and mounts follow that choice."""
    try:
        derived, token = account.sign_in(api, username, password, _saved_device(state, api.base_url, username))
    except ServerError as exc:
        raise _not_a_server(api, exc) from None
    keys = derived.keys
    acct = api.account()
    keyring = account.Keyring.unlock(acct, keys.kek)      # proves the keys open the account
    account.ensure_identity(api, keyring)                 # accounts from before sharing get one now
    for path in state.reset_corrupt():                    # a fresh login is the way out of it
        _warn(f"{path} was corrupt: removed")
    ledger = VersionLedger(state.ledger_path)
    try:
        ledger.check_key_gen(UUID(acct["root_inode"]), keyring.current_gen)
    finally:
        ledger.close()
    state.save_config(server=api.base_url, username=username, token=token["access_token"],
                      insecure_http=insecure_http, **({"device": token["device"]} if token.get("device") else {}))
    state.save_keys(user_id=token["user_id"], username=username, auth_key=keys.auth_key, kek=keys.kek)
    print(f"logged in as {username}")


def _saved_device(state: LocalState, server: str, username: str) -> str | None:
    """This machine's device credential for that account, if it has one."""
    try:
        cfg = state.config()
    except CorruptState:
        return None
    same = cfg.get("server") == server and str(cfg.get("username", "")).lower() == username.lower()
    return cfg.get("device") if same else None


def cmd_logout(args, state: LocalState) -> None:
    try:
        cfg = state.config()
    except CorruptState:
        cfg = {}        # no token to revoke that can be trusted; the local secrets still go
    if cfg.get("token"):
        try:
            ApiClient(cfg["server"], cfg["token"], retry_seconds=1, timeout=5,
                      insecure_http=args.insecure_http or bool(cfg.get("insecure_http"))).logout(args.all)
        except ServerError:
            pass        # refused: the token was no longer valid anyway
        except ZkfsError as exc:
            # Unreachable (or not to be reached over plain http): the local secrets
            # go regardless, that is what logout promises here.
            _warn(f"the server could not revoke this session ({exc}); it stays valid until it expires")
    state.forget_login()
    print("logged out")


def cmd_passwd(args, state: LocalState) -> None:
    vault = open_vault(state, insecure_http=args.insecure_http)
    username = state.keys()["username"]
    if args.password_stdin:
        current, new = _stdin_line(), _stdin_line()
    else:
        current = _ask("Current password: ")
        new = _ask("New password: ")
        if _ask("Repeat new password: ") != new:
            raise ZkfsError("passwords do not match")
    _check_password(new)
    try:
        keys = account.derive(vault.api, username, current).keys
    except account.WrongPassword:
        raise ZkfsError("the current password is wrong") from None
    new_keys, token = account.change_password(vault.api, username, keys, new)
    state.save_config(token=token["access_token"])
    state.save_keys(user_id=token["user_id"], username=username, auth_key=new_keys.auth_key, kek=new_keys.kek)
    print("password changed")


def cmd_rotate_key(args, state: LocalState) -> None:
    vault = open_vault(state, insecure_http=args.insecure_http)
    username = state.keys()["username"]
    try:
        keys = account.derive(vault.api, username, read_password(args, "Current password: ")).keys
    except account.WrongPassword:
        raise ZkfsError("wrong password") from None
    try:
        account.Keyring.unlock(vault.api.account(), keys.kek)
    except ZkfsError:
        raise ZkfsError("wrong password") from None
    _owned_shares_unfinished(vault)
    start = time.perf_counter()
    if args.full:
        result = _rotate_full(vault, keys)
        vault.ledger.check_key_gen(vault.root, result.generation)
        print(f"all keys rotated (generation {result.generation}): {result.resealed} names and attribute "
              f"sets re-sealed, {result.files} files ({result.bytes} bytes) re-encrypted "
              f"in {time.perf_counter() - start:.2f} s")
        return
    result = account.rotate_master_key(vault.api, keys)
    vault.ledger.check_key_gen(vault.root, result["generation"])
    print(f"master key rotated to generation {result['generation']}: "
          f"{result['files']} file keys re-wrapped in {time.perf_counter() - start:.2f} s")


def _owned_shares_unfinished(vault: Vault) -> None:
    """rotate-key moves the file keys of a folder being made a share too: finish that first."""
    for share in vault.domains.shares.values():
        if share.mine and share.state == "converting":
            raise ZkfsError(f"sharing {share.name} was interrupted: run `client.py share` for it again first")


def _rotate_full(vault: Vault, keys: PasswordKeys):
    from tqdm import tqdm
    kw = dict(disable=None, leave=False, file=sys.stderr)
    with tqdm(desc="names and attributes", unit=" items", **kw) as names, \
            tqdm(desc="files re-encrypted", unit="B", unit_scale=True, unit_divisor=1024, **kw) as data:
        return rotation.rotate_full(vault, keys, rotation.Progress(
            entries=names.update, files=lambda n, nbytes: data.update(nbytes)))


def _remote_dir(vault: Vault, path: str, *, create: bool) -> Node:
    node = vault.get(vault.root)
    for part in split_path(path):
        child = vault.lookup(node.id, part)
        if child is None:
            if not create:
                raise ZkfsError(f"{path}: no such directory on the server")
            child = _create_dir(vault, node, part)
        elif not child.is_dir:
            raise ZkfsError(f"{path}: not a directory")
        node = child
    return node


def _create_dir(vault: Vault, parent: Node, name: str) -> Node:
    inode = uuid4()
    try:
        vault.apply([vault.op_create(parent.id, name, inode, new_attrs(stat.S_IFDIR | 0o755))])
    except ServerError as exc:
        existing = vault.lookup(parent.id, name) if exc.code == "exists" else None
        if existing is None or not existing.is_dir:
            raise
        return existing             # another upload created it just now: use theirs
    return vault.get(inode)


def _check_remote(path: str) -> str:
    """``path`` if every name in it is one the server can hold. Checked before any
    change, so `mkdir a/../b` does not create /a and then fail."""
    for part in path.split("/"):
        if part == "..":
            raise ZkfsError(f"{path}: '..' is not supported in remote paths; "
                            "give the path from / (e.g. /Photos/2024)")
        if part not in ("", "."):
            encode_name(part)           # NameTooLong: main() says so in one line
    return path


def _join(*parts: str) -> str:
    return "/" + "/".join(p for part in parts for p in split_path(part))


def cmd_upload(args, state: LocalState) -> None:
    to = _check_remote(args.to or "/")
    src = Path(args.path)
    if src.name in ("", ".", ".."):      # `upload -r ..` uploads the folder by its real name
        src = src.resolve()
    if not src.exists():
        raise ZkfsError(f"{src}: no such file or directory")
    if src.is_dir() and not args.recursive:
        raise ZkfsError(f"{src} is a directory (use -r)")
    if not src.is_dir() and not src.is_file():
        raise NotRegularFile(f"{src} is {kind_of(src)}: only files and folders can be uploaded")
    _check_remote(src.name)
    vault = open_vault(state, insecure_http=args.insecure_http)
    uploader = _Uploader(vault, state)
    try:
        if src.is_dir():
            files = _tree_files(src)
            with _progress(sum(_size(p) for p in files), src.name) as bar:
                uploader.batch(bar)
                for path in files:
                    rel = path.relative_to(src).parent.as_posix()
                    try:
                        uploader.upload(path, _join(to, src.name, rel))
                    except NotRegularFile as exc:       # swapped for a FIFO or device since the walk
                        _warn(f"skipped {exc}")
                uploader.finish()
        else:
            uploader.upload(src, to)
    finally:
        uploader.save()
        vault.ledger.flush()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _tree_files(top: Path) -> list[Path]:
    """The regular files under ``top`` (symlinks to files followed, symlinked folders
    not entered); everything else is skipped with a warning, never opened."""
    def unreadable(exc: OSError) -> None:      # os.walk would skip it silently
        _warn(f"skipped {exc.filename}: {exc.strerror}")

    files = []
    for folder, dirs, names in os.walk(top, onerror=unreadable):
        for name in dirs:
            if Path(folder, name).is_symlink():
                _warn(f"skipped {Path(folder, name)} (a symlink to a folder)")
        for name in names:
            path = Path(folder, name)
            if path.is_file():
                files.append(path)
            else:
                _warn(f"skipped {path} ({kind_of(path)})")
    return sorted(files)


class _Uploader:
    """Uploads files, resolving each remote folder once and listing it once; in a
    tree (``batch``), small files go hundreds per request under one progress bar."""

    def __init__(self, vault: Vault, state: LocalState):
        self.vault = vault
        self.state = state
        self.records = state.uploads()
        self.changed: dict[str, dict] = {}
        self.dirs: dict[str, Node] = {}
        self.listings: dict[UUID, dict[str, Node]] = {}
        self.publisher: BatchPublisher | None = None
        self.bar = None

    def batch(self, bar) -> None:
        self.publisher, self.bar = BatchPublisher(self.vault), bar

    def finish(self) -> None:
        if self.publisher is not None:
            self.publisher.close()

    def _dir(self, remote_dir: str) -> Node:
        key = _join(remote_dir)
        if key not in self.dirs:
            self.dirs[key] = _remote_dir(self.vault, remote_dir, create=True)
        return self.dirs[key]

    def _listing(self, parent: Node) -> dict[str, Node]:
        if parent.id not in self.listings:
            self.listings[parent.id] = dict(self.vault.listdir(parent.id))
        return self.listings[parent.id]

    def upload(self, src: Path, remote_dir: str) -> None:
        remote = _check_remote(_join(remote_dir, src.name))
        parent = self._dir(remote_dir)
        existing = self._listing(parent).get(src.name)
        record = self.records.get(remote)
        sha = None
        # The server's copy must be the very version uploaded from here (another
        # machine may have changed it since, even to the same size).
        if record and existing is not None and str(existing.id) == record["uuid"] \
                and existing.version == record.get("version") \
                and existing.attrs.size == record["size"] == src.stat().st_size:
            sha = file_sha256(src)        # read twice only when a skip is possible
            if sha == record["sha256"]:
                if self.bar is not None:
                    self.bar.update(src.stat().st_size)
                print(f"skipped {remote} (unchanged)")
                return
        if self.publisher is not None:
            prepared = prepare_upload(self.vault, src, parent, src.name, self.bar.update if self.bar else None,
                                      existing)
            if sha is not None and prepared.sha256 != sha:
                raise ZkfsError(f"{src} changed while it was being uploaded; run the upload again")
            self.listings[parent.id][src.name] = prepared.node
            self.publisher.add(prepared, lambda p, remote=remote: self._uploaded(remote, p.node, p.sha256))
            return
        with _progress(src.stat().st_size, src.name) as bar:
            node, uploaded_sha = upload_file(self.vault, src, parent, src.name, bar.update, existing)
        if sha is not None and uploaded_sha != sha:
            raise ZkfsError(f"{src} changed while it was being uploaded; run the upload again")
        self.listings[parent.id][src.name] = node
        self._uploaded(remote, node, uploaded_sha)

    def _uploaded(self, remote: str, node: Node, sha: str) -> None:
        self.records[remote] = self.changed[remote] = {
            "uuid": str(node.id), "sha256": sha, "size": node.attrs.size, "version": node.version}
        message = f"uploaded {remote} ({node.attrs.size} bytes)"
        if self.bar is not None:
            self.bar.write(message, file=sys.stdout)
        else:
            print(message)

    def save(self) -> None:
        if self.changed:
            self.state.update_uploads(self.changed)


def cmd_download(args, state: LocalState) -> None:
    _check_remote(args.name)
    vault = open_vault(state, insecure_http=args.insecure_http)
    node, remote = _find(vault, state, args.name)
    if node.is_dir:
        raise ZkfsError(f"{remote} is a directory")
    if not node.attrs.is_reg:
        raise ZkfsError(f"{remote} is not a regular file")
    name = split_path(remote)[-1]
    dest = _download_target(args.output, name, state)
    check_download_target(dest)         # before creating any folder for it
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _progress(node.attrs.size, name) as bar:
        download_file(vault, node, dest, bar.update)
    vault.ledger.flush()
    print(f"downloaded {remote} -> {dest}")


def _download_target(output: str | None, name: str, state: LocalState) -> Path:
    """Where `download` writes: ``-o FILE``; ``-o DIR`` or ``-o DIR/`` (created if
    missing, like --to) keeps the name; default: download_dir, relative to the cwd."""
    if not output:
        return Path(state.config()["download_dir"]).expanduser() / name
    dest = Path(output)
    if output.endswith("/"):
        if dest.exists() and not dest.is_dir():
            raise ZkfsError(f"{output}: not a directory")
        return dest / name
    return dest / name if dest.is_dir() else dest


def _find(vault: Vault, state: LocalState, name: str) -> tuple[Node, str]:
    """A path from the root, or a bare name recorded in uploaded_file.json."""
    if "/" not in name:
        matches = [p for p in state.uploads() if split_path(p)[-1] == name]
        if len(matches) == 1:
            return vault.resolve(matches[0]), matches[0]
        if len(matches) > 1 and _join(name) not in matches:
            raise ZkfsError(f"{name} is ambiguous: {', '.join(sorted(matches))}")
    return vault.resolve(name), _join(name)


def cmd_ls(args, state: LocalState) -> None:
    _check_remote(args.path)
    vault = open_vault(state, insecure_http=args.insecure_http)
    node = vault.resolve(args.path)
    entries = vault.listdir(node.id) if node.is_dir else [(split_path(args.path)[-1], node)]
    for name, child in sorted(entries, key=lambda e: e[0]):
        a = child.attrs
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(child.attrs.mtime_ns / 1e9))
        suffix = "/" if child.is_dir else ""
        print(f"{stat.filemode(a.mode)} {a.size:>12} {when} {name}{suffix}")
    vault.ledger.flush()


def cmd_mkdir(args, state: LocalState) -> None:
    _check_remote(args.path)
    vault = open_vault(state, insecure_http=args.insecure_http)
    _remote_dir(vault, args.path, create=True)
    print(f"created {_join(args.path)}")


def cmd_rm(args, state: LocalState) -> None:
    _check_remote(args.path)
    vault = open_vault(state, insecure_http=args.insecure_http)
    parts = split_path(args.path)
    if not parts:
        raise ZkfsError("refusing to remove the root")
    parent = vault.resolve("/".join(parts[:-1]))
    node = vault.lookup(parent.id, parts[-1])
    if node is None:
        raise ZkfsError(f"{args.path}: no such file or directory on the server")
    if node.is_dir and not args.recursive:
        raise ZkfsError(f"{args.path} is a directory (use -r)")
    gone = _join(args.path)
    records = state.uploads()        # read first: a corrupt file fails before the delete
    _remove(vault, parent, parts[-1], node)
    state.update_uploads({remote: None for remote in records
                          if remote == gone or remote.startswith(gone + "/")})
    print(f"removed {_join(args.path)}")


def _remove(vault: Vault, parent: Node, name: str, node: Node) -> None:
    if node.is_dir:
        for child_name, child in vault.listdir(node.id):
            _remove(vault, node, child_name, child)
        vault.apply([vault.op_rmdir(parent.id, name, node.id)])
    else:
        vault.apply([vault.op_unlink(parent.id, name, node.id)])


def cmd_mv(args, state: LocalState) -> None:
    _check_remote(args.src)
    _check_remote(args.dst)
    vault = open_vault(state, insecure_http=args.insecure_http)
    src, dst = split_path(args.src), split_path(args.dst)
    if not src or not dst:
        raise ZkfsError("cannot move the root")
    src_parent = vault.resolve("/".join(src[:-1]))
    node = vault.lookup(src_parent.id, src[-1])
    if node is None:
        raise ZkfsError(f"{args.src}: no such file or directory on the server")
    target_parent = vault.resolve("/".join(dst[:-1]))
    existing = vault.lookup(target_parent.id, dst[-1])
    if existing is not None and existing.is_dir:
        target_parent, dst = existing, dst + [src[-1]]
        existing = vault.lookup(target_parent.id, dst[-1])
    vault.apply([vault.op_rename(node, src_parent.id, src[-1], target_parent.id, dst[-1], replaces=existing)])
    print(f"moved {_join(args.src)} -> {_join(*dst)}")


def cmd_df(args, state: LocalState) -> None:
    vault = open_vault(state, insecure_http=args.insecure_http)
    s = vault.api.statfs()
    quota = "unlimited" if s["quota_bytes"] is None else f"{s['quota_bytes']} bytes"
    print(f"used {s['used_bytes']} bytes, free {s['free_bytes']} bytes, quota {quota}")


# ---------------------------------------------------------------- links for anyone
def cmd_link(args, state: LocalState) -> None:
    if args.revoke or args.list:
        if args.path or args.expires or args.with_password:
            raise ZkfsError("--revoke and --list take no path, --expires or --password")
    elif not args.path:
        raise ZkfsError("give the file to link (or --list, or --revoke ID|URL)")
    expires = _duration(args.expires) if args.expires else None
    if args.revoke:
        link_id = links.link_id_of(args.revoke)
        vault = open_vault(state, insecure_http=args.insecure_http)
        vault.api.revoke_link(link_id)
        print(f"revoked {link_id}: it answers no one any more")
        return
    vault = open_vault(state, insecure_http=args.insecure_http)
    if args.list:
        _print_links(links.listing(vault))
        return
    _check_remote(args.path)
    password = _check_password(read_password(args, "Link password: ", confirm=True)) if args.with_password else None
    node, remote = _find(vault, state, args.path)
    url = links.create(vault, node, remote, expires_in=expires, password=password)
    vault.ledger.flush()
    print(url)


def _duration(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise ZkfsError(f"--expires: {exc}") from None


def _print_links(found: list) -> None:
    for info in found:
        if info.revoked_at is not None:
            state = "revoked"
        elif not info.active:
            state = "expired"
        elif info.expires_at is not None:
            state = "expires " + time.strftime("%Y-%m-%d %H:%M", time.localtime(info.expires_at))
        else:
            state = "no expiry"
        made = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.created_at))
        print(f"{info.id}  {made}  {state:<22} {info.path or '(note sealed under a retired key)'}")
        if info.active and info.url:
            print(f"    {info.url}")
    if not found:
        print("no links")


def cmd_fetch(args, state: LocalState) -> None:
    """No account, no state: everything comes from the URL."""
    try:
        url = LinkUrl.parse(args.url)
    except ValueError as exc:
        raise ZkfsError(str(exc)) from None
    output = Path(args.output) if args.output else None
    bars = []

    def progress(file):
        bars.append(_progress(file.size, file.name))
        return bars[0].update

    try:
        dest, sha = links.fetch(url, output, lambda: read_password(args, "Link password: "),
                                insecure_http=args.insecure_http, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    print(f"fetched {dest} ({dest.stat().st_size} bytes, sha256 {sha})")


# ---------------------------------------------------------------- sharing
def cmd_whoami(args, state: LocalState) -> None:
    vault = open_vault(state, insecure_http=args.insecure_http)
    identity = account.ensure_identity(vault.api, vault.keyring)
    print(f"{state.keys()['username']} on {vault.api.base_url}")
    print(f"identity key fingerprint: {fingerprint(identity.public)}")


def _shared_folder(vault: Vault, path: str) -> tuple[Node, str]:
    _check_remote(path)
    if vault.book is not None and vault.book.problems:      # a tampered share: change none
        raise ZkfsError(f"refusing to change shares: {vault.book.problems[0]}")
    parts = split_path(path)
    if not parts:
        raise ZkfsError("the root folder cannot be shared: share a folder in it")
    node = vault.resolve(path)
    if not node.is_dir:
        raise ZkfsError(f"{_join(path)}: only folders can be shared")
    return node, parts[-1]


def _sharing_progress():
    from tqdm import tqdm
    kw = dict(disable=None, leave=False, file=sys.stderr)
    names = tqdm(desc="names, attributes and keys", unit=" items", **kw)
    data = tqdm(desc="files re-encrypted", unit="B", unit_scale=True, unit_divisor=1024, **kw)
    return names, data, rotation.Progress(entries=names.update, files=lambda n, nbytes: data.update(nbytes))


def cmd_share(args, state: LocalState) -> None:
    vault = open_vault(state, insecure_http=args.insecure_http)
    node, name = _shared_folder(vault, args.path)
    pins = Pins(state, vault.api.base_url)
    start = time.perf_counter()
    names, data, progress = _sharing_progress()
    with names, data:
        out = sharing.share_folder(vault, node, name, args.username, read_only=args.read_only, pins=pins,
                                   fingerprint=args.fingerprint, progress=progress)
    member = next(m for m in out.share.members if m["username"].lower() == args.username.lower())
    if out.pinned_now and not args.fingerprint:
        print(f"{member['username']}'s key fingerprint: {fingerprint(b64decode(member['public_key']))} "
              f"(pinned now: compare it with what `client.py whoami` shows {member['username']})")
    mode = "read-only" if args.read_only else "read-write"
    print(f"shared {_join(args.path)} with {member['username']} ({mode}): {out.resealed} names and attribute "
          f"sets re-sealed, {out.files} file keys moved in {time.perf_counter() - start:.2f} s")


def cmd_unshare(args, state: LocalState) -> None:
    vault = open_vault(state, insecure_http=args.insecure_http)
    node, _name = _shared_folder(vault, args.path)
    start = time.perf_counter()
    names, data, progress = _sharing_progress()
    with names, data:
        out = sharing.unshare_folder(vault, node, args.username, pins=Pins(state, vault.api.base_url),
                                     reencrypt=args.reencrypt, progress=progress)
    took = time.perf_counter() - start
    done = (f"{out.files} files ({out.bytes} bytes) re-encrypted" if args.reencrypt else
            "files written before keep their keys until `unshare --reencrypt`")
    print(f"{args.username} removed from {_join(args.path)}; keys rotated to generation {out.share.current_gen}: "
          f"{out.resealed} names and attribute sets re-sealed, {done} ({took:.2f} s)")


def cmd_shares(args, state: LocalState) -> None:
    vault = open_vault(state, insecure_http=args.insecure_http)
    shares = sorted(vault.domains.shares.values(), key=lambda s: (not s.mine, s.owner.lower(), s.name))
    mine = [s for s in shares if s.mine]
    theirs = [s for s in shares if not s.mine]
    print("shared by you:" if mine else "shared by you: nothing")
    for s in mine:
        who = ", ".join(f"{m['username']} ({'read-only' if m['read_only'] else 'read-write'})"
                        for m in s.members) or "nobody"
        print(f"  {s.name}: with {who}" + ("" if s.state == "ready" else f" [{s.state}: unfinished]"))
    print("shared with you:" if theirs else "shared with you: nothing")
    for s in theirs:
        mode = "read-only" if s.read_only else "read-write"
        print(f"  /Shared/{s.owner}/{s.name} ({mode}; {s.owner}'s key fingerprint {fingerprint(s.owner_public)})")
    for problem in vault.book.problems if vault.book is not None else ():
        _warn(problem)


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="client.py", description=(
        "zkfs: zero-knowledge encrypted cloud storage. Everything is encrypted here before it "
        "leaves this machine. State lives in $ZKFS_HOME (default ~/.zkfs)."))
    p.add_argument("--debug", action="store_true", help="log HTTP requests and show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--insecure-http", action="store_true", help=(
        "allow plain http:// to a server that is not this machine (everything but the "
        "encrypted content would be open to the network); login saves this choice"))

    def pw_args(sp, positional=True):
        if positional:
            sp.add_argument("password", nargs="?", help="password (prefer the prompt or --password-stdin)")
        sp.add_argument("--password-stdin", action="store_true", help="read the password from standard input")

    sp = sub.add_parser("register", parents=[common], help="create an account (and log in)")
    sp.add_argument("username")
    pw_args(sp)
    sp.add_argument("--server", help="server URL, saved in config.json")
    sp.set_defaults(func=cmd_register)

    sp = sub.add_parser("login", parents=[common], help="log in and save the token and keys (0600)")
    sp.add_argument("username")
    pw_args(sp)
    sp.add_argument("--server", help="server URL, saved in config.json")
    sp.set_defaults(func=cmd_login)

    sp = sub.add_parser("logout", parents=[common], help="forget the token and keys on this machine")
    sp.add_argument("--all", action="store_true",
                    help="also end every other device's session (their mounts must log in again)")
    sp.set_defaults(func=cmd_logout)

    sp = sub.add_parser("upload", parents=[common], help="encrypt and upload a file (or a folder with -r)")
    sp.add_argument("path")
    sp.add_argument("--to", metavar="DIR", help="remote folder (created if missing), default /")
    sp.add_argument("-r", "--recursive", action="store_true")
    sp.set_defaults(func=cmd_upload)

    sp = sub.add_parser("download", parents=[common], help="download and decrypt a file")
    sp.add_argument("name", help="remote path, or a name recorded by upload")
    sp.add_argument("-o", "--output", help="file, or folder (a trailing / creates it); default: the "
                    "current folder (download_dir in config.json, if set to a path)")
    sp.set_defaults(func=cmd_download)

    sp = sub.add_parser("ls", parents=[common], help="list a remote folder")
    sp.add_argument("path", nargs="?", default="/")
    sp.set_defaults(func=cmd_ls)

    sp = sub.add_parser("mkdir", parents=[common], help="create a remote folder (and its parents)")
    sp.add_argument("path")
    sp.set_defaults(func=cmd_mkdir)

    sp = sub.add_parser("mv", parents=[common], help="rename or move a remote file or folder (atomic)")
    sp.add_argument("src")
    sp.add_argument("dst")
    sp.set_defaults(func=cmd_mv)

    sp = sub.add_parser("rm", parents=[common], help="remove a remote file (or folder with -r)")
    sp.add_argument("path")
    sp.add_argument("-r", "--recursive", action="store_true")
    sp.set_defaults(func=cmd_rm)

    sp = sub.add_parser("df", parents=[common], help="show used and free space")
    sp.set_defaults(func=cmd_df)

    sp = sub.add_parser("link", parents=[common], help=(
        "print a link for anyone to one file, as it is now (the key stays in the URL's #fragment, "
        "never sent to the server); --list the links, --revoke one"))
    sp.add_argument("path", nargs="?", help="remote path, or a name recorded by upload")
    sp.add_argument("--expires", metavar="DURATION", help="e.g. 7d, 12h, 30m, 2w (default: never)")
    sp.add_argument("--password", dest="with_password", action="store_true",
                    help="also ask a password to open it (asked here, or one line of --password-stdin)")
    sp.add_argument("--password-stdin", action="store_true", help="read the link's password from standard input")
    sp.add_argument("--revoke", metavar="ID|URL", help="end a link now: it answers no one any more")
    sp.add_argument("--list", action="store_true", help="this account's links, with their URLs")
    sp.set_defaults(func=cmd_link)

    sp = sub.add_parser("fetch", parents=[common], help=(
        "download and verify what a link points to (no account needed)"))
    sp.add_argument("url", help="the link: https://SERVER/s/ID#KEY (quote it in the shell)")
    sp.add_argument("-o", "--output", help=(
        "file or folder (default: the linked name, here; an existing file is replaced only if named here)"))
    sp.add_argument("--password-stdin", action="store_true", help="read the link's password from standard input")
    sp.set_defaults(func=cmd_fetch)

    sp = sub.add_parser("passwd", parents=[common], help="change the password (re-wraps one key, no file touched)")
    sp.add_argument("--password-stdin", action="store_true",
                    help="read the current password, then the new one, one per line")
    sp.set_defaults(func=cmd_passwd)

    sp = sub.add_parser("rotate-key", parents=[common], help=(
        "new master key; re-wraps every file key, no content re-encrypted (--full: new keys for "
        "everything, every name and file re-encrypted; resumable)"))
    pw_args(sp, positional=False)
    sp.add_argument("--full", action="store_true", help=(
        "after a key may have leaked: new master, namespace and file keys, every name, attribute "
        "and file re-encrypted (run it again to finish after an interruption)"))
    sp.set_defaults(func=cmd_rotate_key)

    sp = sub.add_parser("whoami", parents=[common], help="show this account and its identity key's fingerprint")
    sp.set_defaults(func=cmd_whoami)

    sp = sub.add_parser("share", parents=[common], help=(
        "share a folder with another user (its names, attributes and keys move to keys of its own; "
        "they see it under /Shared/<you>/)"))
    sp.add_argument("path", help="remote folder, e.g. /Projects")
    sp.add_argument("username")
    sp.add_argument("--read-only", action="store_true", help="they may read, not change (the server enforces it)")
    sp.add_argument("--fingerprint", help=(
        "their identity key's fingerprint, checked with them out of band (`client.py whoami`): "
        "refuses any other key, and replaces a pinned one"))
    sp.set_defaults(func=cmd_share)

    sp = sub.add_parser("unshare", parents=[common], help=(
        "remove a user from a shared folder at once, and rotate its keys (resumable)"))
    sp.add_argument("path")
    sp.add_argument("username")
    sp.add_argument("--reencrypt", action="store_true", help=(
        "also re-encrypt every file under a new key, so nothing they could have kept opens what "
        "the server holds (run it again to finish after an interruption)"))
    sp.set_defaults(func=cmd_unshare)

    sp = sub.add_parser("shares", parents=[common], help="list what you share, with whom, and what is shared with you")
    sp.set_defaults(func=cmd_shares)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args, LocalState())
        sys.stdout.flush()          # here, so a closed pipe is handled below, not at exit
        return 0
    except BrokenPipeError:
        # the reader went away (`client.py ls | head -1`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except NameTooLong as exc:      # a local name no check above caught
        print(f"error: name too long (over {MAX_NAME_BYTES} bytes): {str(exc)[:40]}...", file=sys.stderr)
        return 1
    except ZkfsError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if args.debug:
            raise
        print(f"error: {exc.strerror or exc}{': ' + exc.filename if exc.filename else ''}", file=sys.stderr)
        return 1
    except Exception as exc:   # last resort: still one line, never a traceback
        if args.debug:
            raise
        print(f"error: unexpected {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 2
