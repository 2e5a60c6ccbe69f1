"""The key work of shared folders, as pure logic (docs/FORMAT.md "Shared folders"):
grants open only for their member, from their owner, for their share, generation
and folder; the identity key is bound to its public half; the members seal is the
owner's alone."""
from __future__ import annotations

import os
from uuid import uuid4

import pytest

from zkfs import crypto
from zkfs.crypto import IdentityKey, IntegrityError
from zkfs.sharekeys import grant, open_grant


def test_a_grant_opens_for_its_member_only_and_only_for_what_it_was_made_for():
    alice, bob, carol = IdentityKey.generate(), IdentityKey.generate(), IdentityKey.generate()
    share, root, secret = uuid4(), uuid4(), os.urandom(32)
    wrapped = grant(alice, share, 3, root, alice.public, bob.public, secret)
    assert open_grant(bob, share, 3, root, alice.public, wrapped) == secret
    own = grant(alice, share, 3, root, alice.public, alice.public, secret)
    assert open_grant(alice, share, 3, root, alice.public, own) == secret
    for who, sh, gen, rt, owner in ((carol, share, 3, root, alice.public),        # another member
                                    (bob, uuid4(), 3, root, alice.public),        # another share
                                    (bob, share, 2, root, alice.public),          # another generation
                                    (bob, share, 3, uuid4(), alice.public),       # another folder
                                    (bob, share, 3, root, carol.public)):         # "from" another owner
        with pytest.raises(IntegrityError):
            open_grant(who, sh, gen, rt, owner, wrapped)


def test_identity_keys_fingerprints_and_members_seal():
    a = IdentityKey.generate()
    assert IdentityKey(a.raw).public == a.public and len(a.public) == 32
    fp = crypto.fingerprint(a.public)
    assert len(fp.split()) == 6 and fp != crypto.fingerprint(IdentityKey.generate().public)
    with pytest.raises(IntegrityError):
        a.agree(bytes(32))                     # a low-order point: no shared secret
    master = os.urandom(32)
    wrapped = crypto.wrap_key(master, a.raw, crypto.identity_context(1, a.public))
    with pytest.raises(IntegrityError):        # paired with another public key: does not open
        crypto.unwrap_key(master, wrapped, crypto.identity_context(1, IdentityKey.generate().public))
    share, bob = uuid4(), IdentityKey.generate().public
    members = [("Bob", bob, False)]
    seal = crypto.members_seal(a, share, 2, members)
    assert seal == crypto.members_seal(a, share, 2, [("bob", bob, False)])    # usernames: any case
    for other in (crypto.members_seal(a, share, 3, members), crypto.members_seal(a, share, 2, [("bob", bob, True)]),
                  crypto.members_seal(a, share, 2, members + [("mallory", os.urandom(32), False)]),
                  crypto.members_seal(IdentityKey.generate(), share, 2, members)):
        assert other != seal
