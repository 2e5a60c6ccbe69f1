"""Pure tests of the crypto core (zkfs/crypto.py) and the content/metadata
encoding (zkfs/format.py). No server, no I/O: fast."""
from __future__ import annotations

import base64
import os
import random
import struct
from uuid import UUID, uuid4

import pytest
from cryptography.fernet import Fernet, InvalidToken

from zkfs import crypto
from zkfs.crypto import (BinaryFernet, IntegrityError, KdfParams, NamespaceKey,
                         TOKEN_OVERHEAD_MAX, derive_password_keys, file_key_context,
                         master_context, namespace_context, unwrap_key, wrap_key)
from zkfs.format import (CHUNK_SIZE, HOLE_REF, SEGMENT_SIZE, Attrs, ChunkRef, Manifest, open_chunk,
                         open_name, open_segments, seal_chunk, seal_name, segment_span,
                         segment_token_size)

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
SIZES = [0, 1, 15, 16, 17, MiB]
# Cheap Argon2id parameters: the derivation logic is what is under test.
FAST = dict(memory_kib=1024, iterations=1, lanes=1)


def flip(data: bytes, bit: int) -> bytes:
    b = bytearray(data)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


def payload(n: int) -> bytes:
    return os.urandom(n)


# ------------------------------------------------------------------ BinaryFernet
@pytest.mark.parametrize("size", SIZES)
def test_binary_fernet_token_is_a_fernet_token(size):
    key = crypto.random_key()
    data = payload(size)
    token = BinaryFernet(key).encrypt(data)
    fernet = Fernet(base64.urlsafe_b64encode(key))
    assert fernet.decrypt(base64.urlsafe_b64encode(token)) == data
    # and the binary form is exactly the base64-decoded Fernet layout
    assert len(token) == 1 + 8 + 16 + (size // 16 + 1) * 16 + 32
    assert token[0] == 0x80


@pytest.mark.parametrize("size", SIZES)
def test_fernet_token_decrypts_with_binary_fernet(size):
    key = crypto.random_key()
    data = payload(size)
    token = Fernet(base64.urlsafe_b64encode(key)).encrypt(data)
    assert BinaryFernet(key).decrypt(base64.urlsafe_b64decode(token)) == data


@pytest.mark.parametrize("size", SIZES)
def test_binary_fernet_round_trip(size):
    key = crypto.random_key()
    data = payload(size)
    f = BinaryFernet(key)
    t1, t2 = f.encrypt(data), f.encrypt(data)
    assert f.decrypt(t1) == data
    assert t1 != t2, "a fresh IV per token"
    if size >= 16:
        assert data[:16] not in t1


def test_binary_fernet_known_answer_matches_fernet_spec():
    """Fixed IV and timestamp: byte-identical to the reference implementation."""
    key = bytes(range(32))
    iv = bytes(range(100, 116))
    now = 1_700_000_000
    data = b"the quick brown fox jumps over the lazy dog"
    ours = BinaryFernet(key).encrypt(data, _iv=iv, _now=now)
    ref = Fernet(base64.urlsafe_b64encode(key))._encrypt_from_parts(data, now, iv)
    assert base64.urlsafe_b64encode(ours) == ref


def test_tokens_carry_no_seal_time_and_old_tokens_still_open():
    """The timestamp field is a constant (the server would read when every name,
    attribute set and chunk was sealed); stock Fernet still opens the tokens
    (without a ttl), and tokens sealed with a real time still open here."""
    key = crypto.random_key()
    f = BinaryFernet(key)
    tokens = [f.encrypt(b"a"), f.encrypt(b"b" * 100)]
    assert {t[1:9] for t in tokens} == {bytes(8)}
    assert Fernet(base64.urlsafe_b64encode(key)).decrypt(base64.urlsafe_b64encode(tokens[1])) == b"b" * 100
    old = f.encrypt(b"sealed in 2023", _now=1_700_000_000)
    assert old[1:9] == struct.pack(">Q", 1_700_000_000) and f.decrypt(old) == b"sealed in 2023"


def test_binary_fernet_rejects_wrong_key_size():
    with pytest.raises(ValueError):
        BinaryFernet(bytes(16))


def test_every_bit_flip_is_detected_small_token():
    key = crypto.random_key()
    f = BinaryFernet(key)
    token = f.encrypt(b"x" * 17)        # header + 2 blocks + tag: every region covered
    for bit in range(len(token) * 8):
        with pytest.raises(IntegrityError):
            f.decrypt(flip(token, bit))


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, MiB])
def test_bit_flips_anywhere_are_detected(size):
    key = crypto.random_key()
    f = BinaryFernet(key)
    token = f.encrypt(payload(size))
    n = len(token) * 8
    rng = random.Random(size)
    # first and last bit of every region (version, timestamp, IV, ciphertext, tag)
    # and random positions
    bits = {0, 7, 8, 8 * 9 - 1, 8 * 9, 8 * 25 - 1, 8 * 25, n - 8 * 32 - 1, n - 8 * 32, n - 1}
    bits |= {rng.randrange(n) for _ in range(40 if size < MiB else 12)}
    for bit in sorted(b for b in bits if 0 <= b < n):
        with pytest.raises(IntegrityError):
            f.decrypt(flip(token, bit))
    # and the stock implementation agrees these are invalid
    fernet = Fernet(base64.urlsafe_b64encode(key))
    with pytest.raises(InvalidToken):
        fernet.decrypt(base64.urlsafe_b64encode(flip(token, n - 1)))


@pytest.mark.parametrize("size", [0, 16, 1000])
def test_truncated_extended_and_foreign_tokens_rejected(size):
    key = crypto.random_key()
    f = BinaryFernet(key)
    token = f.encrypt(payload(size))
    for bad in (b"", token[:1], token[:-1], token[:-16], token[:-32], token[1:], token + b"\0",
                token + bytes(16), token[:25] + token[41:]):
        with pytest.raises(IntegrityError):
            f.decrypt(bad)
    with pytest.raises(IntegrityError):
        BinaryFernet(crypto.random_key()).decrypt(token)


# ------------------------------------------------------------------ key wrapping
def test_wrap_unwrap_round_trip_and_context_binding():
    master = crypto.random_key()
    file_key = crypto.random_key()
    a, b = uuid4(), uuid4()
    wrapped = wrap_key(master, file_key, file_key_context(a))
    assert file_key not in wrapped
    assert unwrap_key(master, wrapped, file_key_context(a)) == file_key
    # the key of inode A cannot be unwrapped as the key of inode B
    with pytest.raises(IntegrityError):
        unwrap_key(master, wrapped, file_key_context(b))
    # nor as any other kind of key
    for ctx in (master_context(1), namespace_context(1, ROOT), b"", b"file", file_key_context(a) + b"x",
                file_key_context(a)[:-1]):
        with pytest.raises(IntegrityError):
            unwrap_key(master, wrapped, ctx)
    # nor with another wrapping key
    with pytest.raises(IntegrityError):
        unwrap_key(crypto.random_key(), wrapped, file_key_context(a))
    # tampering is detected
    with pytest.raises(IntegrityError):
        unwrap_key(master, flip(wrapped, 8 * 40), file_key_context(a))


ROOT = uuid4()


def test_namespace_context_binds_the_root_folder():
    master, ns = crypto.random_key(), NamespaceKey.generate()
    wn = wrap_key(master, ns.raw, namespace_context(1, ROOT))
    with pytest.raises(IntegrityError):
        unwrap_key(master, wn, namespace_context(1, uuid4()))


def test_master_and_namespace_contexts_bind_generation():
    kek, master = crypto.random_key(), crypto.random_key()
    w = wrap_key(kek, master, master_context(1))
    assert unwrap_key(kek, w, master_context(1)) == master
    with pytest.raises(IntegrityError):
        unwrap_key(kek, w, master_context(2))
    with pytest.raises(IntegrityError):
        unwrap_key(kek, w, namespace_context(1, ROOT))
    ns = NamespaceKey.generate()
    wn = wrap_key(master, ns.raw, namespace_context(3, ROOT))
    assert unwrap_key(master, wn, namespace_context(3, ROOT)) == ns.raw
    with pytest.raises(IntegrityError):
        unwrap_key(master, wn, namespace_context(4, ROOT))


# ------------------------------------------------------------------ password KDF
def test_argon2id_derivation_deterministic_and_separated():
    params = KdfParams(salt=b"s" * 16, **FAST)
    k1 = derive_password_keys("correct horse battery staple", params)
    k2 = derive_password_keys("correct horse battery staple", params)
    assert k1 == k2
    assert len(k1.auth_key) == 32 and len(k1.kek) == 32
    assert k1.auth_key != k1.kek
    other_pw = derive_password_keys("correct horse battery stapl3", params)
    assert other_pw.auth_key != k1.auth_key and other_pw.kek != k1.kek
    other_salt = derive_password_keys("correct horse battery staple", KdfParams(salt=b"t" * 16, **FAST))
    assert other_salt.auth_key != k1.auth_key and other_salt.kek != k1.kek
    other_cost = derive_password_keys("correct horse battery staple",
                                      KdfParams(salt=b"s" * 16, memory_kib=2048, iterations=1, lanes=1))
    assert other_cost.kek != k1.kek
    # the auth key (sent to the server) reveals nothing usable as the KEK
    assert k1.kek not in (k1.auth_key, crypto.digest(k1.auth_key))


def test_argon2id_is_argon2id():
    """The root secret is Argon2id output (checked against the reference primitive)."""
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
    params = KdfParams(salt=os.urandom(16), **FAST)
    root = Argon2id(salt=params.salt, length=32, iterations=1, lanes=1, memory_cost=1024).derive(b"pw-123456")
    keys = derive_password_keys("pw-123456", params)
    expand = lambda label: HKDFExpand(hashes.SHA256(), 32, b"zkfs/v1/" + label).derive(root)  # noqa: E731
    assert keys.auth_key == expand(b"auth")
    assert keys.kek == expand(b"kek")


def test_kdf_params_new_random_salt_at_the_floor():
    a, b = KdfParams.new(), KdfParams.new()
    assert len(a.salt) == 16 and a.salt != b.salt
    assert (a.memory_kib, a.iterations, a.lanes) == (65536, 3, 4) and a.weakness() is None


@pytest.mark.parametrize("change", [dict(memory_kib=65535), dict(iterations=2), dict(salt=b"s" * 15),
                                    dict(lanes=0), dict(lanes=17), dict(memory_kib=4 * 1024 * 1024 + 1),
                                    dict(iterations=65), dict(salt=b"s" * 65)])
def test_kdf_floor_and_ceilings(change):
    assert KdfParams(**(dict(salt=b"s" * 16) | change)).weakness()


def test_kdf_check_binds_username_salt_and_every_parameter():
    params = KdfParams(salt=b"s" * 16, **FAST)
    keys = derive_password_keys("pw-123456", params)
    mac = crypto.kdf_check(keys, "alice", params)
    assert len(mac) == 32 and mac == crypto.kdf_check(derive_password_keys("pw-123456", params), "alice", params)
    others = [crypto.kdf_check(keys, "alicf", params)]
    for change in (dict(salt=b"t" * 16), dict(memory_kib=2048), dict(iterations=2), dict(lanes=2)):
        others.append(crypto.kdf_check(keys, "alice", KdfParams(**(dict(salt=b"s" * 16) | FAST | change))))
    others.append(crypto.kdf_check(derive_password_keys("pw-1234567", params), "alice", params))
    assert mac not in others
    # independent of what is sent to the server
    assert keys.check_key not in (keys.auth_key, keys.kek)


# ------------------------------------------------------------------ manifests and chunks
def make_file(n_chunks: int, last_len: int = 1000):
    inode = uuid4()
    cipher = BinaryFernet(crypto.random_key())
    plains = [os.urandom(CHUNK_SIZE) for _ in range(n_chunks - 1)] + [os.urandom(last_len)]
    sealed = [seal_chunk(cipher, p, uuid4()) for p in plains]
    size = CHUNK_SIZE * (n_chunks - 1) + last_len
    manifest = Manifest(inode=inode, size=size, chunks=[ref for _, ref in sealed])
    return inode, cipher, plains, sealed, manifest


def raw_manifest(inode: UUID, size: int, chunk_size: int, refs: list[ChunkRef], count: int | None = None,
                 magic: bytes = b"ZKM2") -> bytes:
    head = struct.pack(">4s16sQII", magic, inode.bytes, size, chunk_size,
                       len(refs) if count is None else count)
    return head + b"".join(r.blob_id.bytes for r in refs)


@pytest.fixture(scope="module")
def three_chunk_file():
    return make_file(3)


def test_manifest_round_trip(three_chunk_file):
    inode, cipher, plains, sealed, manifest = three_chunk_file
    token = manifest.encrypt(cipher)
    back = Manifest.decrypt(cipher, token, inode)
    assert back.inode == inode and back.size == manifest.size and back.chunks == manifest.chunks
    assert back.chunk_size == CHUNK_SIZE
    for i, (tok, _) in enumerate(sealed):
        assert open_chunk(cipher, tok, back.chunks[i], back.chunk_length(i)) == plains[i]
    assert back.blob_ids() == [r.blob_id for _, r in sealed]


def test_empty_and_hole_manifests_round_trip():
    inode, cipher = uuid4(), BinaryFernet(crypto.random_key())
    empty = Manifest(inode=inode)
    assert Manifest.decrypt(cipher, empty.encrypt(cipher), inode).chunks == []
    holes = Manifest(inode=inode, size=2 * CHUNK_SIZE, chunks=[HOLE_REF, HOLE_REF])
    back = Manifest.decrypt(cipher, holes.encrypt(cipher), inode)
    assert back.chunks == [HOLE_REF, HOLE_REF] and back.blob_ids() == []


def test_manifest_encrypt_refuses_inconsistent_chunk_count():
    inode, cipher = uuid4(), BinaryFernet(crypto.random_key())
    with pytest.raises(ValueError):
        Manifest(inode=inode, size=CHUNK_SIZE + 1, chunks=[HOLE_REF]).encrypt(cipher)


def test_reordered_chunks_rejected(three_chunk_file):
    inode, cipher, plains, sealed, manifest = three_chunk_file
    # the server serves chunk 1's blob where chunk 0 belongs
    with pytest.raises(IntegrityError):
        open_chunk(cipher, sealed[1][0], manifest.chunks[0], manifest.chunk_length(0))
    with pytest.raises(IntegrityError):
        open_chunk(cipher, sealed[0][0], manifest.chunks[1], manifest.chunk_length(1))
    # a manifest with the chunk list reordered is another manifest: its digest (kept in the
    # authenticated attributes) differs, so it cannot stand in for the real one
    reordered = Manifest(inode=inode, size=manifest.size,
                         chunks=[manifest.chunks[1], manifest.chunks[0], manifest.chunks[2]])
    tok_a, tok_b = manifest.encrypt(cipher), reordered.encrypt(cipher)
    assert crypto.digest(tok_a) != crypto.digest(tok_b)
    # and with the chunk order reversed the last (short) chunk fails the length check
    with pytest.raises(IntegrityError):
        open_chunk(cipher, sealed[2][0], manifest.chunks[2], manifest.chunk_length(0))


def test_chunk_swapped_in_from_another_file_rejected(three_chunk_file):
    inode, cipher, plains, sealed, manifest = three_chunk_file
    other_inode, other_cipher, other_plains, other_sealed, other_manifest = make_file(1, last_len=CHUNK_SIZE)
    # another file's chunk served in place of ours: sealed under another key
    with pytest.raises(IntegrityError):
        open_chunk(cipher, other_sealed[0][0], manifest.chunks[0], CHUNK_SIZE)
    # under our key but written as another blob: its segments name that blob
    token, _ = seal_chunk(cipher, other_plains[0], uuid4())
    with pytest.raises(IntegrityError):
        open_chunk(cipher, token, manifest.chunks[0], CHUNK_SIZE)
    # another file's manifest under our inode: wrong key
    with pytest.raises(IntegrityError):
        Manifest.decrypt(cipher, other_manifest.encrypt(other_cipher), inode)


def test_manifest_of_another_inode_rejected(three_chunk_file):
    inode, cipher, plains, sealed, manifest = three_chunk_file
    token = manifest.encrypt(cipher)
    with pytest.raises(IntegrityError):
        Manifest.decrypt(cipher, token, uuid4())
    # even if both files shared a key, the manifest names its inode
    other = Manifest(inode=uuid4(), size=manifest.size, chunks=list(manifest.chunks))
    with pytest.raises(IntegrityError):
        Manifest.decrypt(cipher, other.encrypt(cipher), inode)


@pytest.mark.parametrize("case", ["truncated", "extended", "size_bigger", "size_smaller",
                                  "count_lies", "body_short", "body_long", "zero_chunk_size",
                                  "bad_magic", "empty"])
def test_manifest_tampering_rejected(three_chunk_file, case):
    """Manifests whose chunk list does not match the size they claim never decode
    (whoever produced them). Built by hand and encrypted under the right key."""
    inode, cipher, plains, sealed, manifest = three_chunk_file
    refs = list(manifest.chunks)
    size = manifest.size
    extra = ChunkRef(uuid4())
    plain = {
        "truncated": lambda: raw_manifest(inode, size, CHUNK_SIZE, refs[:2]),
        "extended": lambda: raw_manifest(inode, size, CHUNK_SIZE, refs + [extra]),
        "size_bigger": lambda: raw_manifest(inode, size + 2 * CHUNK_SIZE, CHUNK_SIZE, refs),
        "size_smaller": lambda: raw_manifest(inode, CHUNK_SIZE, CHUNK_SIZE, refs),
        "count_lies": lambda: raw_manifest(inode, size, CHUNK_SIZE, refs, count=4),
        "body_short": lambda: raw_manifest(inode, size, CHUNK_SIZE, refs)[:-1],
        "body_long": lambda: raw_manifest(inode, size, CHUNK_SIZE, refs) + b"\0",
        "zero_chunk_size": lambda: raw_manifest(inode, 0, 0, []),
        "bad_magic": lambda: raw_manifest(inode, size, CHUNK_SIZE, refs, magic=b"ZKM0"),
        "empty": lambda: b"",
    }[case]()
    with pytest.raises(IntegrityError):
        Manifest.decrypt(cipher, cipher.encrypt(plain), inode)


def test_manifest_token_tampering_rejected(three_chunk_file):
    inode, cipher, plains, sealed, manifest = three_chunk_file
    token = manifest.encrypt(cipher)
    for bit in (0, 8 * 30, len(token) * 4, len(token) * 8 - 1):
        with pytest.raises(IntegrityError):
            Manifest.decrypt(cipher, flip(token, bit), inode)
    with pytest.raises(IntegrityError):
        Manifest.decrypt(cipher, token[:-16], inode)


def test_open_chunk_checks_blob_and_length():
    cipher = BinaryFernet(crypto.random_key())
    plain = os.urandom(5000)
    token, ref = seal_chunk(cipher, plain, uuid4())
    assert open_chunk(cipher, token, ref, 5000) == plain
    with pytest.raises(IntegrityError):                     # the manifest names another blob
        open_chunk(cipher, token, ChunkRef(uuid4()), 5000)
    with pytest.raises(IntegrityError):                     # token modified
        open_chunk(cipher, flip(token, 8 * 100), ref, 5000)
    for wrong in (4999, 5001, 0, CHUNK_SIZE):               # length disagrees with manifest
        with pytest.raises(IntegrityError):
            open_chunk(cipher, token, ref, wrong)
    with pytest.raises(IntegrityError):                     # wrong key
        open_chunk(BinaryFernet(crypto.random_key()), token, ref, 5000)


SEGMENTED_SIZES = [1, SEGMENT_SIZE - 1, SEGMENT_SIZE, SEGMENT_SIZE + 1, 5 * SEGMENT_SIZE + 7, CHUNK_SIZE]


@pytest.mark.parametrize("size", SEGMENTED_SIZES)
def test_any_range_opens_from_its_segments_alone(size):
    """A read of any range fetches only the token bytes segment_span names, and
    those decrypt to the plaintext (what the mount does for a random read)."""
    cipher, blob = BinaryFernet(crypto.random_key()), uuid4()
    plain = os.urandom(size)
    token, ref = seal_chunk(cipher, plain, blob)
    assert len(token) == sum(segment_token_size(min(SEGMENT_SIZE, size - off))
                             for off in range(0, size, SEGMENT_SIZE))
    rng = random.Random(size)
    ranges = [(0, 1), (size - 1, size), (0, size)] + \
        [tuple(sorted(rng.sample(range(size + 1), 2))) for _ in range(20) if size > 1]
    for lo, hi in ranges:
        if lo == hi:
            continue
        first, start, end = segment_span(size, lo, hi)
        assert start < end <= len(token)
        got = open_segments(cipher, token[start:end], ref, size, lo, hi)
        base = first * SEGMENT_SIZE
        assert got[lo - base:hi - base] == plain[lo:hi]
        assert len(got) <= hi - base + SEGMENT_SIZE          # nothing past the last segment
    with pytest.raises(ValueError):
        segment_span(size, 0, size + 1)


def segments_of(token: bytes, size: int) -> list[bytes]:
    out, pos = [], 0
    for off in range(0, size, SEGMENT_SIZE):
        n = segment_token_size(min(SEGMENT_SIZE, size - off))
        out.append(token[pos:pos + n])
        pos += n
    assert pos == len(token)
    return out


def test_segments_are_standard_fernet_tokens():
    key = crypto.random_key()
    blob = uuid4()
    plain = os.urandom(3 * SEGMENT_SIZE + 5)
    token, _ = seal_chunk(BinaryFernet(key), plain, blob)
    fernet = Fernet(base64.urlsafe_b64encode(key))
    opened = [fernet.decrypt(base64.urlsafe_b64encode(seg)) for seg in segments_of(token, len(plain))]
    assert [o[:20] for o in opened] == [blob.bytes + struct.pack(">I", j) for j in range(4)]
    assert b"".join(o[20:] for o in opened) == plain


def test_segment_tampering_rejected():
    """Segments cannot be reordered, dropped, added, or moved between chunks, in a
    whole-chunk read or a partial one."""
    cipher = BinaryFernet(crypto.random_key())
    size = 4 * SEGMENT_SIZE
    plain = os.urandom(size)
    token, ref = seal_chunk(cipher, plain, uuid4())
    other, _ = seal_chunk(cipher, os.urandom(size), uuid4())        # same file key
    segs, other_segs = segments_of(token, size), segments_of(other, size)
    swapped = b"".join([segs[1], segs[0]] + segs[2:])
    moved = b"".join([segs[0], other_segs[1]] + segs[2:])
    for bad in (swapped, moved):
        with pytest.raises(IntegrityError):
            open_chunk(cipher, bad, ref, size)
    with pytest.raises(IntegrityError):                     # dropped last segment
        open_chunk(cipher, b"".join(segs[:3]), ref, size)
    with pytest.raises(IntegrityError):                     # one too many
        open_chunk(cipher, token + segs[3], ref, size)
    # partial reads: segment 1 served where segment 2 was asked for, or another
    # chunk's segment 2, or a short/long answer
    first, start, end = segment_span(size, 2 * SEGMENT_SIZE, 2 * SEGMENT_SIZE + 10)
    assert first == 2 and token[start:end] == segs[2]
    for bad in (segs[1], other_segs[2], segs[2][:-1], segs[2] + b"\0", flip(segs[2], 8 * 40)):
        with pytest.raises(IntegrityError):
            open_segments(cipher, bad, ref, size, 2 * SEGMENT_SIZE, 2 * SEGMENT_SIZE + 10)


def test_manifest_chunk_lengths():
    m = Manifest(inode=uuid4(), size=2 * CHUNK_SIZE + 7, chunks=[HOLE_REF] * 3)
    assert [m.chunk_length(i) for i in range(3)] == [CHUNK_SIZE, CHUNK_SIZE, 7]
    assert m.chunk_count_for(0) == 0 and m.chunk_count_for(1) == 1
    assert m.chunk_count_for(CHUNK_SIZE) == 1 and m.chunk_count_for(CHUNK_SIZE + 1) == 2


# ------------------------------------------------------------------ attributes
def sample_attrs() -> Attrs:
    return Attrs(mode=0o100640, uid=1000, gid=1000, size=1234, atime_ns=1, mtime_ns=2, ctime_ns=3,
                 xattrs={"user.tag": b"\x00\xffvalue"}, manifest_digest=os.urandom(32), version=7)


def test_attrs_round_trip():
    ns = NamespaceKey.generate()
    inode = uuid4()
    a = sample_attrs()
    token = a.encrypt(ns, inode)
    assert b"user.tag" not in token
    assert Attrs.decrypt(ns, token, inode, 7) == a


def test_attrs_bound_to_inode_and_version():
    ns = NamespaceKey.generate()
    inode = uuid4()
    token = sample_attrs().encrypt(ns, inode)
    with pytest.raises(IntegrityError):
        Attrs.decrypt(ns, token, uuid4(), 7)       # another inode's attributes
    for v in (6, 8, 1):
        with pytest.raises(IntegrityError):         # replayed older / claimed newer version
            Attrs.decrypt(ns, token, inode, v)
    with pytest.raises(IntegrityError):
        Attrs.decrypt(ns, flip(token, 8 * 50), inode, 7)
    with pytest.raises(IntegrityError):
        Attrs.decrypt(NamespaceKey.generate(), token, inode, 7)
    # well-formed ciphertext of something that is not attributes
    with pytest.raises(IntegrityError):
        Attrs.decrypt(ns, ns.cipher.encrypt(b'{"id": 1}'), inode, 7)
    with pytest.raises(IntegrityError):
        Attrs.decrypt(ns, ns.cipher.encrypt(b"not json"), inode, 7)


# ------------------------------------------------------------------ names
def test_name_round_trip_and_bindings():
    ns = NamespaceKey.generate()
    parent, other_parent = uuid4(), uuid4()
    inode, other_inode = uuid4(), uuid4()
    name = "Résumé 2024 (final).pdf"
    token = seal_name(ns, inode, name)
    assert name.encode() not in token
    h = ns.name_hash(parent, name.encode())
    assert open_name(ns, token, parent=parent, inode=inode, name_hash=h) == name
    # moved to another directory (the server keeps the entry, changes the parent)
    with pytest.raises(IntegrityError):
        open_name(ns, token, parent=other_parent, inode=inode, name_hash=h)
    with pytest.raises(IntegrityError):
        open_name(ns, token, parent=other_parent, inode=inode,
                  name_hash=ns.name_hash(parent, b"other"))
    # moved onto another entry of the same directory
    with pytest.raises(IntegrityError):
        open_name(ns, token, parent=parent, inode=inode, name_hash=ns.name_hash(parent, b"other.txt"))
    # pointing at another inode
    with pytest.raises(IntegrityError):
        open_name(ns, token, parent=parent, inode=other_inode, name_hash=h)
    # another entry's sealed name swapped in
    other_token = seal_name(ns, inode, "other.txt")
    with pytest.raises(IntegrityError):
        open_name(ns, other_token, parent=parent, inode=inode, name_hash=h)
    # tampered, or sealed by another account
    with pytest.raises(IntegrityError):
        open_name(ns, flip(token, 8 * 40), parent=parent, inode=inode, name_hash=h)
    with pytest.raises(IntegrityError):
        open_name(NamespaceKey.generate(), token, parent=parent, inode=inode, name_hash=h)


def test_name_hash_keyed_and_parent_bound():
    ns1, ns2 = NamespaceKey.generate(), NamespaceKey.generate()
    p = uuid4()
    assert ns1.name_hash(p, b"a") == ns1.name_hash(p, b"a")
    assert ns1.name_hash(p, b"a") != ns2.name_hash(p, b"a")
    assert ns1.name_hash(p, b"a") != ns1.name_hash(uuid4(), b"a")
    assert len(ns1.name_hash(p, b"a")) == 64


# ------------------------------------------------------------------ overhead
@pytest.mark.parametrize("size", [MiB, MiB + 1, 3 * MiB + 12345, 10 * MiB])
def test_storage_overhead_below_one_percent(size):
    inode = uuid4()
    file_key = crypto.random_key()
    cipher = BinaryFernet(file_key)
    data = os.urandom(size)
    refs, stored = [], 0
    for off in range(0, size, CHUNK_SIZE):
        token, ref = seal_chunk(cipher, data[off:off + CHUNK_SIZE], uuid4())
        segments = -(-len(data[off:off + CHUNK_SIZE]) // SEGMENT_SIZE)
        assert len(token) <= len(data[off:off + CHUNK_SIZE]) + segments * (20 + TOKEN_OVERHEAD_MAX)
        refs.append(ref)
        stored += len(token)
    manifest_token = Manifest(inode=inode, size=size, chunks=refs).encrypt(cipher)
    wrapped_key = wrap_key(crypto.random_key(), file_key, file_key_context(inode))
    stored += len(manifest_token) + len(wrapped_key)
    overhead = (stored - size) / size
    assert overhead < 0.01, f"{overhead:.4%} overhead for {size} bytes"
