"""Per-family transformer layouts: where each layer's attention and MLP weights live in a state dict.

Defenses and attacks never name layer keys directly. They ask a ``TransformerLayout`` for a
layer's Q, K, V, O, MLP-in, gate and MLP-out weights as standard ``[out_features, in_features]``
matrices (hiding GPT-2's fused, transposed Conv1D weights) and write them back the same way.

The architecture facts are the ``FAMILIES`` table below; ``detect_layout`` picks a row from the
config's ``model_type`` and finds the key prefix (``bert.``, ``model.``, ``transformer.``, ...)
from the state-dict keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

PARTS = ("q", "k", "v", "o", "mlp_in", "gate", "mlp_out")
ATTN_PARTS = ("q", "k", "v", "o")
MLP_PARTS = ("mlp_in", "gate", "mlp_out")


class UnsupportedArchitecture(ValueError):
    """The model's architecture has no ``TransformerLayout``."""


@dataclass(frozen=True)
class FamilySpec:
    """Key templates of one model family, relative to ``<prefix><blocks>.<layer>.``.

    ``modules`` pairs each part with its linear module path (``None``: the family has no such
    part); it is a tuple so that specs and layouts stay hashable.
    With ``fused_qkv`` set, Q, K and V are the three equal blocks ``[Q|K|V]`` along the output axis
    of that one module. ``transposed`` means weights are stored ``[in, out]`` (GPT-2 Conv1D).
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    modules: tuple[tuple[str, str | None], ...]
    fused_qkv: str | None = None
    transposed: bool = False
    rope: bool = False

    def module(self, part: str) -> str | None:
        return dict(self.modules).get(part)


FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec(
        name="bert",
        model_types=("bert",),
        blocks="encoder.layer",
        modules=(
            ("q", "attention.self.query"),
            ("k", "attention.self.key"),
            ("v", "attention.self.value"),
            ("o", "attention.output.dense"),
            ("mlp_in", "intermediate.dense"),
            ("gate", None),
            ("mlp_out", "output.dense"),
        ),
    ),
    FamilySpec(
        name="clip_vision",
        model_types=("clip_vision_model", "clip"),
        blocks="encoder.layers",
        modules=(
            ("q", "self_attn.q_proj"),
            ("k", "self_attn.k_proj"),
            ("v", "self_attn.v_proj"),
            ("o", "self_attn.out_proj"),
            ("mlp_in", "mlp.fc1"),
            ("gate", None),
            ("mlp_out", "mlp.fc2"),
        ),
    ),
    FamilySpec(
        name="gpt2",
        model_types=("gpt2",),
        blocks="h",
        modules=(
            ("q", "attn.c_attn"),
            ("k", "attn.c_attn"),
            ("v", "attn.c_attn"),
            ("o", "attn.c_proj"),
            ("mlp_in", "mlp.c_fc"),
            ("gate", None),
            ("mlp_out", "mlp.c_proj"),
        ),
        fused_qkv="attn.c_attn",
        transposed=True,
    ),
    FamilySpec(
        name="llama",
        model_types=("llama", "qwen2", "mistral"),
        blocks="layers",
        modules=(
            ("q", "self_attn.q_proj"),
            ("k", "self_attn.k_proj"),
            ("v", "self_attn.v_proj"),
            ("o", "self_attn.o_proj"),
            ("mlp_in", "mlp.up_proj"),
            ("gate", "mlp.gate_proj"),
            ("mlp_out", "mlp.down_proj"),
        ),
        rope=True,
    ),
)


def supported_families() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)


@dataclass(frozen=True)
class TransformerLayout:
    """Where one model's per-layer attention and MLP weights are, and its head geometry.

    Query head ``h`` uses key/value head ``h // (num_heads // num_kv_heads)`` (HF ``repeat_kv``).
    With ``rope`` set, query/key dimensions ``i`` and ``i + head_dim // 2`` of a head form one
    rotary pair (HF ``rotate_half`` convention).
    """

    family: str
    prefix: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    spec: FamilySpec

    # ---- geometry -------------------------------------------------------------------------
    @property
    def rope(self) -> bool:
        return self.spec.rope

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    @property
    def parts(self) -> tuple[str, ...]:
        """The parts this family has, in ``PARTS`` order."""
        return tuple(p for p in PARTS if self.spec.module(p) is not None)

    @property
    def has_gate(self) -> bool:
        return self.spec.module("gate") is not None

    def out_features(self, part: str) -> int | None:
        """Rows of a part's standard matrix when fixed by the head geometry (else ``None``)."""
        return {
            "q": self.num_heads * self.head_dim,
            "k": self.num_kv_heads * self.head_dim,
            "v": self.num_kv_heads * self.head_dim,
            "o": self.hidden_size,
            "mlp_out": self.hidden_size,
        }.get(part)

    # ---- keys -----------------------------------------------------------------------------
    def module_path(self, layer: int, part: str) -> str:
        mod = self.spec.module(part)
        if mod is None:
            raise KeyError(f"{self.family} has no part {part!r}; parts: {', '.join(self.parts)}")
        return f"{self.prefix}{self.spec.blocks}.{layer}.{mod}"

    def weight_key(self, layer: int, part: str) -> str:
        return self.module_path(layer, part) + ".weight"

    def bias_key(self, layer: int, part: str) -> str:
        return self.module_path(layer, part) + ".bias"

    def layer_keys(self, layer: int, sd: Mapping[str, torch.Tensor]) -> list[str]:
        """The state-dict keys the layer's parts occupy (weights, and biases that exist)."""
        keys: list[str] = []
        for part in self.parts:
            for k in (self.weight_key(layer, part), self.bias_key(layer, part)):
                if k in sd and k not in keys:
                    keys.append(k)
        return keys

    def _qkv_slice(self, part: str) -> slice:
        d = self.hidden_size
        i = "qkv".index(part)
        return slice(i * d, (i + 1) * d)

    # ---- read / write ---------------------------------------------------------------------
    def read(
        self, sd: Mapping[str, torch.Tensor], layer: int, part: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A part's weight as ``[out_features, in_features]`` and its bias (``None`` if absent)."""
        w = sd[self.weight_key(layer, part)]
        bk = self.bias_key(layer, part)
        b = sd.get(bk)
        if self.spec.transposed:
            w = w.t()
        if self.spec.fused_qkv is not None and part in ("q", "k", "v"):
            s = self._qkv_slice(part)
            w = w[s]
            b = b[s] if b is not None else None
        return w, b

    def write(
        self,
        sd: MutableMapping[str, torch.Tensor],
        layer: int,
        part: str,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> None:
        """Store a standard ``[out, in]`` weight (and bias) into ``sd`` in the family's layout.

        Entries are replaced by new tensors (never modified in place) in the dtype of the tensor
        they replace, so a shallow copy of a state dict can be written without touching the source.
        """
        wk = self.weight_key(layer, part)
        old = sd[wk]
        stored = weight.t() if self.spec.transposed else weight
        if self.spec.fused_qkv is not None and part in ("q", "k", "v"):
            s = self._qkv_slice(part)
            new = old.clone()
            if self.spec.transposed:
                new[:, s] = stored.to(old.dtype)
            else:
                new[s] = stored.to(old.dtype)
            sd[wk] = new
        else:
            if tuple(stored.shape) != tuple(old.shape):
                raise ValueError(
                    f"{wk}: new weight has shape {tuple(stored.shape)}, expected {tuple(old.shape)}"
                )
            sd[wk] = stored.to(old.dtype).contiguous()
        if bias is not None:
            bk = self.bias_key(layer, part)
            if bk not in sd:
                raise KeyError(f"{bk}: the model has no bias here")
            if self.spec.fused_qkv is not None and part in ("q", "k", "v"):
                newb = sd[bk].clone()
                newb[self._qkv_slice(part)] = bias.to(newb.dtype)
                sd[bk] = newb
            else:
                sd[bk] = bias.to(sd[bk].dtype).contiguous()

    def residual_writer_weights(
        self, sd: Mapping[str, torch.Tensor], device: str = "cpu"
    ) -> ResidualWriters:
        """Each layer's attention output and MLP output projections as ``[hidden_size, in]``,
        keyed ``(layer, "attn_out" | "mlp_out")`` and read from ``sd`` on access."""
        return ResidualWriters(self, sd, device)

    # ---- modules --------------------------------------------------------------------------
    def block_modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The per-layer transformer blocks of ``model`` (a model built from the same config).

        Looks first at this layout's key prefix, then at any ``ModuleList`` named like the
        family's block list with ``num_layers`` entries, so a model with or without a task or
        LM head wrapper works.
        """
        path = f"{self.prefix}{self.spec.blocks}"
        try:
            mods = model.get_submodule(path)
        except AttributeError:
            mods = None
        if not (isinstance(mods, torch.nn.ModuleList) and len(mods) == self.num_layers):
            candidates = [
                (name, m)
                for name, m in model.named_modules()
                if isinstance(m, torch.nn.ModuleList)
                and len(m) == self.num_layers
                and (name == self.spec.blocks or name.endswith("." + self.spec.blocks))
            ]
            if not candidates:
                raise ValueError(
                    f"no {self.num_layers}-layer block list '{self.spec.blocks}' in "
                    f"{type(model).__name__}"
                )
            # Prefer the candidate that shares this layout's prefix (CLIP: the vision tower).
            candidates.sort(key=lambda nm: (self.prefix.rstrip(".") not in nm[0], len(nm[0])))
            mods = candidates[0][1]
        return list(mods)


def _family_for(model_type: str) -> FamilySpec:
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise UnsupportedArchitecture(
        f"unsupported architecture {model_type!r}; supported families: {supported_families()}"
    )


def _check_rope(config: PretrainedConfig) -> None:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    factor = getattr(config, "partial_rotary_factor", None)
    if factor is None and isinstance(params, Mapping):
        factor = params.get("partial_rotary_factor")
    if factor is not None and float(factor) != 1.0:
        raise UnsupportedArchitecture(
            f"partial rotary embeddings (factor {factor}) are not supported; "
            f"supported families: {supported_families()}"
        )


def detect_layout(config: PretrainedConfig, keys: Iterable[str]) -> TransformerLayout:
    """The layout of a model given its config and its state-dict keys.

    Raises ``UnsupportedArchitecture`` (a ``ValueError``) naming the supported families when the
    config's ``model_type`` has no layout, and ``ValueError`` when the keys do not hold the
    family's layers.
    """
    model_type = getattr(config, "model_type", None) or type(config).__name__
    fam = _family_for(model_type)
    if model_type == "clip":
        config = config.vision_config
    if fam.rope:
        _check_rope(config)
    keys = list(keys)
    probe = f"{fam.blocks}.0.{fam.module('q')}.weight"
    pattern = re.compile(rf"^(.*?){re.escape(probe)}$")
    prefixes = sorted({m.group(1) for k in keys if (m := pattern.match(k))}, key=len)
    if model_type == "clip":
        # CLIPModel keys carry ``vision_model.``; transformers 5's CLIPVisionModel has none.
        prefixes = [p for p in prefixes if not p.startswith("text_model")]
    if not prefixes or (prefixes[0] and not prefixes[0].endswith(".")):
        raise ValueError(
            f"no key ends in '{probe}': the state dict does not hold {fam.name} layers"
        )
    prefix = prefixes[0]

    num_layers = int(config.num_hidden_layers)
    num_heads = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    num_kv = int(getattr(config, "num_key_value_heads", None) or num_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // num_heads)
    if num_heads % num_kv:
        raise ValueError(f"{num_heads} attention heads do not split into {num_kv} key/value groups")
    if fam.fused_qkv is not None and num_heads * head_dim != hidden:
        raise ValueError(f"{fam.name}: heads × head_dim = {num_heads * head_dim} ≠ hidden {hidden}")
    if fam.rope and head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    layout = TransformerLayout(
        family=fam.name,
        prefix=prefix,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=head_dim,
        hidden_size=hidden,
        spec=fam,
    )
    keyset = set(keys)
    for layer in (0, num_layers - 1):
        for part in layout.parts:
            if layout.weight_key(layer, part) not in keyset:
                raise ValueError(
                    f"{fam.name} layout: missing key '{layout.weight_key(layer, part)}' "
                    f"(config says {num_layers} layers)"
                )
    if layout.weight_key(num_layers, "q") in keyset:
        raise ValueError(f"{fam.name} layout: the state dict has more than {num_layers} layers")
    return layout


def layout_for_model(model: torch.nn.Module) -> TransformerLayout:
    """``detect_layout`` for an instantiated Hugging Face model."""
    return detect_layout(model.config, model.state_dict().keys())


class ResidualWriters(Mapping[tuple[int, str], torch.Tensor]):
    """A layout's residual writers read one matrix at a time from a (lazy) state dict.

    Indexing ``(layer, "attn_out" | "mlp_out")`` reads that one weight (``[hidden, in]``, onto
    ``device``), so ``weight_directions`` over two of these holds two matrices at a time, not two
    models, and runs its SVDs on ``device``.
    """

    _PARTS = {"attn_out": "o", "mlp_out": "mlp_out"}

    def __init__(
        self, layout: TransformerLayout, sd: Mapping[str, torch.Tensor], device: str = "cpu"
    ):
        self.layout, self.sd, self.device = layout, sd, device

    def __getitem__(self, key: tuple[int, str]) -> torch.Tensor:
        layer, writer = key
        if writer not in self._PARTS or not 0 <= layer < self.layout.num_layers:
            raise KeyError(key)
        return self.layout.read(self.sd, layer, self._PARTS[writer])[0].to(self.device)

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return ((layer, w) for layer in range(self.layout.num_layers) for w in self._PARTS)

    def __len__(self) -> int:
        return 2 * self.layout.num_layers
