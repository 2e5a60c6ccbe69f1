def test_mount_roundtrip(account, make_mount):
    server, machine = account
    m = make_mount(machine)
    (m.path / "hello.txt").write_bytes(b"hi there")
    assert (m.path / "hello.txt").read_bytes() == b"hi there"
    m.unmount()
    assert not m.is_mounted()
    m2 = make_mount(machine)
    assert (m2.path / "hello.txt").read_bytes() == b"hi there"
