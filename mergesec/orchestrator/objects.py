"""Create-if-absent writes on object stores, which ``pyarrow.fs`` cannot express.

S3 (and the servers that speak its API) refuse a ``PUT`` with ``If-None-Match: *`` when the key
exists, so exactly one of several writers creates it. pyarrow does not expose that header; boto3
does, and is used when it is installed and the store is ``s3://``. Elsewhere the write is a check
followed by a write, and the store's leases keep two writers of one node apart.
"""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import parse_qsl, unquote, urlsplit


def _split(uri: str, path: str) -> tuple[str, str]:
    bucket, _, key = path.partition("/")
    return bucket, key


@lru_cache(maxsize=8)
def _client(uri: str):
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        return None
    parts = urlsplit(uri)
    q = dict(parse_qsl(parts.query))
    kwargs: dict[str, str] = {}
    endpoint = q.get("endpoint_override")
    if endpoint:
        scheme = q.get("scheme", "https")
        kwargs["endpoint_url"] = endpoint if "://" in endpoint else f"{scheme}://{endpoint}"
    if q.get("region"):
        kwargs["region_name"] = q["region"]
    key, secret = q.get("access_key"), q.get("secret_key")
    if parts.username and parts.password:
        key, secret = unquote(parts.username), unquote(parts.password)
    if key and secret:
        kwargs["aws_access_key_id"], kwargs["aws_secret_access_key"] = key, secret
        if q.get("session_token"):
            kwargs["aws_session_token"] = q["session_token"]
    return boto3.client("s3", config=Config(retries={"max_attempts": 5}), **kwargs)


def conditional_client(uri: str):
    """A boto3 S3 client for ``uri`` when create-if-absent is possible there, else None."""
    return _client(uri) if uri.startswith("s3://") else None


def put_if_absent(fs, uri: str, path: str, data: bytes) -> bool:
    """Write ``data`` at ``path`` unless an object is there; True if this call created it."""
    client = conditional_client(uri)
    if client is not None:
        from botocore.exceptions import ClientError

        bucket, key = _split(uri, path)
        try:
            client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (
                409,
                412,
            ):
                return False
            raise
    import pyarrow.fs

    if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        return False
    with fs.open_output_stream(path) as f:
        f.write(data)
    return True
