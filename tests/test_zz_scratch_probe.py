import os, time, hashlib, threading, subprocess, sys
def test_probe(account, make_mount, make_machine):
    srv, m1 = account
    mnt = make_mount(m1)
    p = mnt.path / "big.bin"
    p.write_bytes(os.urandom(4 << 20))
    base = os.urandom(1 << 20)
    t = time.monotonic()
    with open(p, "wb") as f:   # O_TRUNC
        t1 = time.monotonic()
        print("open took", t1 - t)
        # check server state via CLI ls on machine 2
        m2 = make_machine(srv); m2.login(m1.username)
        print(m2.run("ls", "/").stdout)
        for i in range(200):
            f.write(i.to_bytes(8, "big") + base[8:])
        t2 = time.monotonic()
        print("write 200MB took", t2 - t1)
    print("close took", time.monotonic() - t2)
    print(m2.run("ls", "/").stdout)
    st = sum(f.stat().st_size for f in (srv.data_dir/"storage").rglob("*") if f.is_file())
    print("storage", st)
    t = time.monotonic()
    sha = hashlib.sha256(p.read_bytes()).hexdigest()
    print("read took", time.monotonic() - t)
    src = mnt.path.parent / "src.bin"
    t = time.monotonic()
    with open("/tmp/scratch/src.bin", "wb") as f:
        for i in range(200):
            f.write(i.to_bytes(8, "big") + base[8:])
    t = time.monotonic()
    m2.run("upload", "/tmp/scratch/src.bin")
    print("cli upload 200MB", time.monotonic() - t)
