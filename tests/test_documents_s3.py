"""Documents in an S3-compatible server: moto's server mode as a separate process over HTTP (no
in-process mock). The store writes, reads and checks objects, hands out presigned URLs that a
plain HTTP client downloads, reads locations the local store wrote, and the API redirects a PDF
download to the bucket."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import boto3
import httpx
import pytest

from adapters.storage import S3DocumentStore, document_store
from devstack.services import free_port
from schema.models import Invoice
from tests import factories
from tests.credit_note_support import finalized_invoice
from tests.test_api_support import api_client

PDF = b"%PDF-1.7\n% a test document\n"
BUCKET = "roomly-documents"


@pytest.fixture(scope="module")
def s3_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{url}/moto-api/", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(10)
        log.close()


@pytest.fixture
def bucket(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_DEFAULT_REGION", "eu-central-1"),
    ):
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=s3_url, region_name="eu-central-1")
    client.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-central-1"})
    yield BUCKET
    for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        client.delete_object(Bucket=BUCKET, Key=item["Key"])
    client.delete_bucket(Bucket=BUCKET)


async def test_put_get_exists_and_a_presigned_download(s3_url: str, bucket: str):
    store = S3DocumentStore(bucket, prefix="dev", endpoint_url=s3_url, region="eu-central-1", url_ttl=60)
    location = await store.put("invoices/t1/INV-000001.pdf", PDF)
    assert location == f"s3://{bucket}/dev/invoices/t1/INV-000001.pdf"
    assert await store.get(location) == PDF
    assert await store.exists(location)
    assert not await store.exists(f"s3://{bucket}/dev/invoices/t1/none.pdf")
    again = await store.put("invoices/t1/INV-000001.pdf", PDF + b"v2")  # a retried render replaces
    assert again == location and await store.get(location) == PDF + b"v2"
    url = await store.download_url(location, "INV-000001.pdf", "application/pdf")
    assert url is not None and "X-Amz-Signature=" in url
    download = httpx.get(url)
    assert download.status_code == 200 and download.content == PDF + b"v2"
    assert download.headers["content-type"] == "application/pdf"
    assert 'filename="INV-000001.pdf"' in download.headers["content-disposition"]
    # (moto's server does not check presigned signatures or expiry; S3 does: not testable here.)


async def test_a_location_the_local_store_wrote_is_read_from_the_bucket(s3_url: str, bucket: str):
    store = S3DocumentStore(bucket, endpoint_url=s3_url, region="eu-central-1")
    boto3.client("s3", endpoint_url=s3_url, region_name="eu-central-1").put_object(
        Bucket=bucket, Key="invoices/t1/INV-000002.pdf", Body=PDF
    )
    assert await store.get("invoices/t1/INV-000002.pdf") == PDF  # moved over, rows unchanged
    with pytest.raises(ValueError, match="not in bucket"):
        await store.get("s3://another-bucket/invoices/t1/INV-000002.pdf")
    with pytest.raises(ValueError, match="invalid document key"):
        await store.get("../secrets")


@pytest.mark.db
async def test_the_api_redirects_a_pdf_download_to_the_bucket(s3_url, bucket, sessions, settings, temporal_env):
    configured = settings.model_copy(
        update={"documents_backend": "s3", "s3_bucket": bucket, "s3_endpoint_url": s3_url, "s3_region": "eu-central-1"}
    )
    store = document_store(configured)
    assert isinstance(store, S3DocumentStore)
    sub = await factories.subscriber(sessions, await factories.catalog(sessions), datetime(2026, 1, 10, tzinfo=UTC))
    invoice_id, _ = await finalized_invoice(sessions, sub)
    location = await store.put(f"invoices/{sub.tenant_id}/INV-000001.pdf", PDF)
    async with sessions() as s:
        invoice = await s.get(Invoice, invoice_id)
        assert invoice is not None
        invoice.pdf_location = location
        await s.commit()
    async with api_client(configured, temporal_env.client) as api:
        answer = await api.get(f"/v1/invoices/{invoice_id}/pdf")
    assert answer.status_code == 307 and answer.headers["cache-control"] == "no-store"
    downloaded = httpx.get(answer.headers["location"])
    assert downloaded.status_code == 200 and downloaded.content == PDF


def test_s3_needs_a_bucket():
    from core.settings import Settings

    with pytest.raises(ValueError, match="S3_BUCKET"):
        Settings(documents_backend="s3")
