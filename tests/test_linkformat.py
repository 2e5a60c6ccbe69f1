"""The link format (zkfs/linkformat.py, docs/FORMAT.md §8), as pure functions: what
opens a record and what does not, what the URL holds, what the padding hides."""
from __future__ import annotations

import os
from uuid import uuid4

import pytest

from zkfs import crypto
from zkfs.crypto import IntegrityError, KdfParams, NamespaceKey
from zkfs.linkformat import (
    LinkedFile,
    LinkUrl,
    LockedRecord,
    new_link,
    open_note,
    open_record,
    parse_duration,
    seal_note,
    seal_record,
    unlock_record,
)


def linked(name: str = "report.pdf", size: int = 12345) -> LinkedFile:
    return LinkedFile(name=name, size=size, inode=uuid4(), key=os.urandom(32), manifest=os.urandom(32),
                      mtime_ns=1_765_000_000_123_456_789)


def test_a_record_opens_with_its_secret_and_link_id_only():
    link_id, secret = new_link()
    file = linked()
    token = seal_record(secret, link_id, file)
    assert open_record(secret, link_id, token) == file
    with pytest.raises(IntegrityError):
        open_record(os.urandom(16), link_id, token)          # another key
    with pytest.raises(IntegrityError):
        open_record(secret, os.urandom(16), token)           # served under another link's id
    flipped = token[:30] + bytes([token[30] ^ 1]) + token[31:]
    with pytest.raises(IntegrityError):
        open_record(secret, link_id, flipped)


def test_a_password_record_needs_the_password_and_the_secret():
    link_id, secret = new_link()
    file = linked()
    token = seal_record(secret, link_id, file, "correct horse")
    locked = open_record(secret, link_id, token)
    assert isinstance(locked, LockedRecord) and locked.kdf.weakness() is None
    assert (locked.kdf.memory_kib, locked.kdf.iterations) == (64 * 1024, 3)       # the accounts' floor
    assert unlock_record(secret, link_id, locked, "correct horse") == file
    with pytest.raises(IntegrityError):
        unlock_record(secret, link_id, locked, "correct horsf")
    with pytest.raises(IntegrityError):       # the password alone, with another secret, opens nothing
        unlock_record(os.urandom(16), link_id, locked, "correct horse")
    # the content key takes both: it is neither the secret-only key nor the password's root
    root = crypto.password_root("correct horse", locked.kdf)
    assert crypto.link_content_key(secret, link_id, root) not in (
        crypto.link_record_key(secret, link_id), root)


def test_record_lengths_tell_neither_the_name_nor_the_password():
    link_id, secret = new_link()
    kdf = KdfParams.new()
    sizes = {len(seal_record(secret, link_id, linked(name), pw, kdf))
             for name in ("a", "ü" * 127, "x" * 255) for pw in (None, "pw")}
    assert len(sizes) == 1, sizes


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", ".", "..", "nul\0byte", "x" * 256])
def test_a_record_naming_no_plain_file_name_is_refused(name):
    link_id, secret = new_link()
    token = seal_record(secret, link_id, linked(name))
    with pytest.raises(IntegrityError, match="malformed"):
        open_record(secret, link_id, token)


def test_the_url_carries_the_secret_in_the_fragment_only():
    link_id, secret = new_link()
    url = LinkUrl("https://files.example.org/zkfs", link_id, secret)
    text = str(url)
    assert text.startswith("https://files.example.org/zkfs/s/") and len(text.split("#")[1]) == 22
    assert LinkUrl.parse(text) == url
    assert secret.hex() not in text.split("#")[0]
    for bad in (text.split("#")[0], text[:-3], "ftp://x/s/" + text.split("/s/")[1], text.replace("/s/", "/t/")):
        with pytest.raises(ValueError):
            LinkUrl.parse(bad)


def test_the_owners_note_opens_with_the_namespace_key_for_this_link_only():
    ns, link_id, secret = NamespaceKey.generate(), *new_link()
    note = seal_note(ns, link_id, secret, "/Reports/q3.pdf")
    assert open_note(ns, link_id, note) == (secret, "/Reports/q3.pdf")
    with pytest.raises(IntegrityError):
        open_note(ns, os.urandom(16), note)
    with pytest.raises(IntegrityError):
        open_note(NamespaceKey.generate(), link_id, note)


@pytest.mark.parametrize("text,seconds", [("7d", 7 * 86400), ("12h", 43200), ("30m", 1800), ("2w", 1209600),
                                          ("90", 90), ("45s", 45)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "forever", "-1d", "3y", "4000d", ""])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)
