"""The fast SigV4 presigner (data/presign.py) signs exactly what botocore signs: the same
URL and the same POST form fields, byte for byte, at the same instant, for keys that need
escaping and for every kind of endpoint. (That S3 itself takes them is
tests/integration/test_objectstore.py's, on a real SeaweedFS.)"""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from cotune.orchestrator.data.presign import SigV4Presigner
from cotune.orchestrator.data.s3client import make_client

NOW = datetime.datetime(2026, 12, 2, 13, 47, 34, 654321, tzinfo=datetime.UTC)
KEYS = [
    "jobs/j-1/trials/0/r0/s3/a1/adapter/adapter_model.safetensors",
    "jobs/a b/ü+x~.txt",
    "models/0f/model.tar",
    "odd/=&?#%;,:@$!'()*[]{}|\\^`\"<>",
    "trailing/slash/",
]
ENDPOINTS = [
    ("http://127.0.0.1:8333", "us-east-1"),
    ("http://localhost", "us-east-1"),
    ("https://s3.example.org:443", "eu-central-1"),
    ("https://minio.example.org:9000", "us-west-2"),
    ("http://[::1]:8333", "us-east-1"),
    (None, "eu-west-1"),  # AWS itself: botocore resolves the regional endpoint
]


def _boto(endpoint: str | None, region: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    import botocore.auth
    import botocore.signers

    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: NOW.replace(tzinfo=None))
    monkeypatch.setattr(botocore.signers, "get_current_datetime", lambda: NOW.replace(tzinfo=None))
    return make_client(
        endpoint,
        "AKIDEXAMPLE",
        "secret/with+chars",
        region,
        connect_timeout_s=1,
        read_timeout_s=1,
        max_attempts=1,
    )


@pytest.mark.parametrize(("endpoint", "region"), ENDPOINTS)
def test_get_urls_and_post_forms_equal_botocores(
    endpoint: str | None, region: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = _boto(endpoint, region, monkeypatch)
    signer = SigV4Presigner(
        client.meta.endpoint_url,
        "cotune-bucket",
        "AKIDEXAMPLE",
        "secret/with+chars",
        region,
        clock=NOW.timestamp,
    )
    for key in KEYS:
        want = client.generate_presigned_url(
            "get_object", Params={"Bucket": "cotune-bucket", "Key": key}, ExpiresIn=3600
        )
        assert signer.get_url(key, 3600) == want
        post = client.generate_presigned_post(
            Bucket="cotune-bucket",
            Key=key,
            Conditions=[["content-length-range", 0, 8 << 30]],
            ExpiresIn=1800,
        )
        got = signer.post(key, 0, 8 << 30, 1800)
        assert got.url == post["url"]
        assert got.fields == post["fields"]


def test_the_signing_key_follows_the_day(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past midnight UTC the cached key is the new day's, not yesterday's."""
    late = NOW.replace(hour=23, minute=59, second=59, microsecond=0)
    now = {"t": late.timestamp()}
    signer = SigV4Presigner(
        "http://127.0.0.1:8333", "b-1", "AKIDEXAMPLE", "s", "us-east-1", clock=lambda: now["t"]
    )
    before = signer.get_url("k", 60)
    now["t"] += 2
    import botocore.auth
    import botocore.signers

    tomorrow = (late + datetime.timedelta(seconds=2)).replace(tzinfo=None)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: tomorrow)
    monkeypatch.setattr(botocore.signers, "get_current_datetime", lambda: tomorrow)
    client = make_client(
        "http://127.0.0.1:8333",
        "AKIDEXAMPLE",
        "s",
        "us-east-1",
        connect_timeout_s=1,
        read_timeout_s=1,
        max_attempts=1,
    )
    after = signer.get_url("k", 60)
    assert "20261202" in before and "20261203" in after
    assert after == client.generate_presigned_url(
        "get_object", Params={"Bucket": "b-1", "Key": "k"}, ExpiresIn=60
    )
