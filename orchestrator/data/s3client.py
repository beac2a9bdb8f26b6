"""The boto3 S3 client cotune uses: SigV4, path-style addresses, retries and timeouts.

This and the modules beside it (objectstore.py, presign.py) are the only ones that touch
boto3 (the coordinator extra).
"""

from __future__ import annotations

from typing import Any

from cotune.orchestrator.data.s3errors import ObjectStoreError, describe


def make_client(
    endpoint_url: str | None,
    access_key: str | None,
    secret_key: str | None,
    region: str,
    *,
    connect_timeout_s: float,
    read_timeout_s: float,
    max_attempts: int,
) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        # botocore's standard mode retries 5xx, throttling and connection errors with
        # jittered exponential backoff.
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        # Only where S3 demands it: many S3-compatible servers reject the newer
        # default (CRC checksums with aws-chunked bodies); we check sha256 ourselves.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=config,
    )


def list_buckets(
    endpoint_url: str,
    access_key: str | None,
    secret_key: str | None,
    region: str = "us-east-1",
    timeout_s: float = 2.0,
) -> list[str]:
    """Bucket names at an endpoint, tried once: a cheap authenticated health probe."""
    client = make_client(
        endpoint_url,
        access_key,
        secret_key,
        region,
        connect_timeout_s=timeout_s,
        read_timeout_s=timeout_s,
        max_attempts=1,
    )
    try:
        return [b["Name"] for b in client.list_buckets().get("Buckets", [])]
    except Exception as exc:
        raise ObjectStoreError("ListBuckets", endpoint_url, "", describe(exc)) from exc


def is_stream_failure(exc: BaseException) -> bool:
    """A connection dropped mid-body: botocore retried the request, the body is ours to retry."""
    from botocore.exceptions import ConnectionError, HTTPClientError, IncompleteReadError

    return isinstance(exc, HTTPClientError | ConnectionError | IncompleteReadError)
