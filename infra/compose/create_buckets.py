"""Create the stack's S3 buckets if missing (the compose `buckets` service; the native stack
does the same in infra/local-stack.sh). Retries while the object store is still starting."""

from __future__ import annotations

import os
import sys
import time

import boto3
from botocore.exceptions import BotoCoreError, ClientError


def main(buckets: list[str], timeout_s: float = 120.0) -> int:
    s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT"])
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
            for bucket in buckets:
                if bucket not in existing:
                    s3.create_bucket(Bucket=bucket)
                    print(f"created bucket {bucket}")
            return 0
        except (BotoCoreError, ClientError) as e:
            if time.monotonic() > deadline:
                print(f"create_buckets: {os.environ['S3_ENDPOINT']} not usable after {timeout_s:g} s: {e}",
                      file=sys.stderr)
                return 1
            time.sleep(2)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
