"""boto3 vs obstore on the server's own S3 work (presigning, the HEAD a commit does
per directly uploaded chunk, a 1 MiB PUT, a ranged GET), against SeaweedFS on
127.0.0.1, in one run.

    python bench/s3clients.py        (obstore: pip install -e '.[bench]')
"""
from __future__ import annotations

import os
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from backends import S3Endpoint  # noqa: E402


def timeit(label: str, fn, n: int) -> None:
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    print(f"{label:<34} {(time.perf_counter() - t) / n * 1000:7.3f} ms")


def main() -> None:
    import boto3
    import obstore
    from botocore.config import Config
    from obstore.store import S3Store

    s3 = S3Endpoint().start()
    try:
        b = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1", aws_access_key_id=s3.ACCESS_KEY,
                         aws_secret_access_key=s3.SECRET_KEY,
                         config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))
        o = S3Store(s3.BUCKET, endpoint=s3.endpoint, region="us-east-1", access_key_id=s3.ACCESS_KEY,
                    secret_access_key=s3.SECRET_KEY, client_options={"allow_http": True},
                    virtual_hosted_style_request=False)
        data = os.urandom(1 << 20)
        keys = [f"cmp/{uuid.uuid4()}" for _ in range(200)]
        timeit("boto3 presign GET", lambda i: b.generate_presigned_url(
            "get_object", Params={"Bucket": s3.BUCKET, "Key": keys[i % 200]}, ExpiresIn=300), 2000)
        timeit("boto3 presign PUT + Content-Length", lambda i: b.generate_presigned_url(
            "put_object", Params={"Bucket": s3.BUCKET, "Key": keys[i % 200], "ContentLength": 1 << 20},
            ExpiresIn=300), 2000)
        timeit("obstore sign GET", lambda i: obstore.sign(o, "GET", keys[i % 200], timedelta(seconds=300)), 2000)
        timeit("boto3 put_object 1 MiB", lambda i: b.put_object(Bucket=s3.BUCKET, Key=keys[i], Body=data), 100)
        timeit("obstore put 1 MiB", lambda i: obstore.put(o, keys[100 + i], data), 100)
        timeit("boto3 head_object", lambda i: b.head_object(Bucket=s3.BUCKET, Key=keys[i % 200]), 400)
        timeit("obstore head", lambda i: obstore.head(o, keys[i % 200]), 400)
        timeit("boto3 get 64 KiB range", lambda i: b.get_object(
            Bucket=s3.BUCKET, Key=keys[i % 200], Range="bytes=0-65535")["Body"].read(), 400)
        timeit("obstore get_range 64 KiB", lambda i: bytes(obstore.get_range(o, keys[i % 200], start=0, end=65536)),
               400)
    finally:
        s3.destroy()


if __name__ == "__main__":
    main()
