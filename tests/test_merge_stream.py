"""Streaming merges: sharded output readable, each tensor read once, errors named.

That every merge op streams to the same result as in memory is checked for all registered ops in
``test_merge_conformance.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel

from mergesec.merging.methods.dare import dare_ties
from mergesec.merging.methods.linear import task_arithmetic, weight_average
from mergesec.merging.methods.ties import ties
from mergesec.merging.stream import (
    check_compatible,
    merge_in_memory,
    merged_files,
    read_safetensors_header,
    stream_merge,
)
from mergesec.models.state_dict import LazyStateDict, save_state_dict


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # SVDs on tiny matrices are dominated by thread start-up on a shared CPU.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _bert_state() -> dict[str, torch.Tensor]:
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
    )
    return {k: v.detach().clone() for k, v in BertModel(cfg).state_dict().items()}


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> tuple[Path, list[Path], dict, list[dict]]:
    """A tiny BERT plus extra dtypes/shapes as base, and three perturbed experts on disk."""
    torch.manual_seed(0)
    base = _bert_state()
    base["extra.half"] = torch.randn(4, 6).half()
    base["extra.bf16"] = torch.randn(5, 3).to(torch.bfloat16)
    base["extra.conv"] = torch.randn(2, 3, 2, 2)
    base["extra.scalar"] = torch.tensor(0.5)
    base["extra.steps"] = torch.arange(6)
    base["extra.flag"] = torch.tensor([True, False])
    experts = []
    for _ in range(3):
        e = {}
        for k, v in base.items():
            if v.is_floating_point() and not k.endswith("LayerNorm.bias"):  # one key left unchanged
                e[k] = (v.float() + 0.05 * torch.randn(v.shape)).to(v.dtype)
            else:
                e[k] = v.clone()
        experts.append(e)
    d = tmp_path_factory.mktemp("models")
    save_state_dict(base, d / "base.safetensors")
    paths = []
    for i, e in enumerate(experts):
        save_state_dict(e, d / f"expert{i}.safetensors")
        paths.append(d / f"expert{i}.safetensors")
    return d / "base.safetensors", paths, base, experts


def test_sharded_output_with_index(model_files, tmp_path):
    base_path, expert_paths, base, experts = model_files
    out = tmp_path / "model.safetensors"
    stats = stream_merge(
        task_arithmetic,
        LazyStateDict(base_path),
        [LazyStateDict(p) for p in expert_paths],
        {"coefficient": 0.5},
        out,
        max_shard_bytes=20_000,
        metadata={"op": "merge/task_arithmetic"},
    )
    assert not out.exists()
    assert len(stats.files) > 2 and stats.files == merged_files(out)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(base)
    assert index["metadata"]["total_size"] == stats.bytes_written
    expected = merge_in_memory(task_arithmetic, base, experts, {"coefficient": 0.5})
    seen = {}
    for f in stats.files:
        assert f.name.startswith("model-") and f.name.endswith(
            f"-of-{len(stats.files):05d}.safetensors"
        )
        shard = load_file(f)  # the reference reader validates the layout
        data_bytes = sum(t.numel() * t.element_size() for t in shard.values())
        assert data_bytes <= 20_000 or len(shard) == 1
        seen.update(shard)
    assert set(seen) == set(base)
    assert all(torch.equal(seen[k], expected[k]) for k in base)


def test_header_specs_and_peak_bytes(model_files, tmp_path):
    base_path, expert_paths, base, _ = model_files
    out = tmp_path / "m.safetensors"
    stats = stream_merge(
        ties, LazyStateDict(base_path), [LazyStateDict(p) for p in expert_paths], {}, out
    )
    specs = read_safetensors_header(out)
    assert {k: (s.dtype, s.shape) for k, s in specs.items()} == {
        k: (v.dtype, tuple(v.shape)) for k, v in base.items()
    }
    # per key: base + 3 experts + result, all in the key's dtype
    largest = max(t.numel() * t.element_size() for t in base.values())
    assert stats.peak_tensor_bytes == 5 * largest


def test_dare_subset_of_keys_is_invariant(model_files, tmp_path):
    base_path, expert_paths, base, experts = model_files
    keys = ["encoder.layer.1.output.dense.weight", "extra.half"]
    params = {"drop_rate": 0.6, "seed": 11}
    lazy = [LazyStateDict(p) for p in expert_paths]
    stream_merge(
        dare_ties,
        LazyStateDict(base_path),
        lazy,
        params,
        tmp_path / "sub.safetensors",
        keys=keys,
    )
    full = merge_in_memory(dare_ties, base, experts, params)
    sub = LazyStateDict(tmp_path / "sub.safetensors")
    assert list(sub) == keys
    for k in keys:
        assert torch.equal(sub[k], full[k])
        one = dare_ties({k: base[k]}, [{k: e[k]} for e in experts], **params)
        assert torch.equal(one[k], full[k])


def test_mismatched_shapes_and_keys_are_named(model_files, tmp_path):
    base_path, expert_paths, base, experts = model_files
    bad = dict(experts[1])
    bad["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(64, 31)
    save_state_dict(bad, tmp_path / "bad.safetensors")
    lazy = [LazyStateDict(expert_paths[0]), LazyStateDict(tmp_path / "bad.safetensors")]
    out = tmp_path / "never.safetensors"
    with pytest.raises(ValueError) as err:
        stream_merge(task_arithmetic, LazyStateDict(base_path), lazy, {}, out)
    msg = str(err.value)
    assert "encoder.layer.0.intermediate.dense.weight" in msg
    assert "(64, 31)" in msg and "(64, 32)" in msg and "expert 1" in msg
    assert not out.exists()
    with pytest.raises(
        ValueError, match=r"'encoder.layer.0.intermediate.dense.weight'.*\(64, 31\)"
    ):
        merge_in_memory(ties, base, [experts[0], bad], {})
    missing = {k: v for k, v in experts[0].items() if k != "extra.conv"}
    with pytest.raises(ValueError, match="'extra.conv': expert 0 does not have it"):
        check_compatible(base, [missing])
    with pytest.raises(ValueError, match="'head.weight': expert 0 has it"):
        check_compatible(base, [{**experts[0], "head.weight": torch.zeros(2, 32)}])
    # with explicit keys, other keys of the experts may differ
    check_compatible(base, [{**experts[0], "head.weight": torch.zeros(2, 32)}], keys=["extra.conv"])


def test_failed_merge_removes_partial_files(model_files, tmp_path):
    base_path, expert_paths, _, _ = model_files

    def flaky(base, experts, **_):
        if "layer.1" in next(iter(base)):
            raise RuntimeError("boom")
        return weight_average(base, experts)

    lazy = [LazyStateDict(p) for p in expert_paths]
    with pytest.raises(RuntimeError, match="boom"):
        stream_merge(
            flaky,
            LazyStateDict(base_path),
            lazy,
            {},
            tmp_path / "m.safetensors",
            max_shard_bytes=20_000,
        )
    assert list(tmp_path.iterdir()) == []


def test_op_returning_wrong_dtype_is_refused(model_files, tmp_path):
    base_path, expert_paths, _, _ = model_files

    def to_double(base, experts, **_):
        return {k: v.double() for k, v in weight_average(base, experts).items()}

    with pytest.raises(ValueError, match="expected"):
        stream_merge(
            to_double,
            LazyStateDict(base_path),
            [LazyStateDict(expert_paths[0])],
            {},
            tmp_path / "m.safetensors",
        )


class _CountingLazy(LazyStateDict):
    def __init__(self, paths):
        super().__init__(paths)
        self.reads: list[str] = []

    def __getitem__(self, key: str) -> torch.Tensor:
        self.reads.append(key)
        return super().__getitem__(key)

    def read_into(self, key: str, buffer: torch.Tensor) -> torch.Tensor:
        self.reads.append(key)
        return super().read_into(key, buffer)


def test_each_tensor_is_read_once(model_files, tmp_path):
    base_path, expert_paths, base, _ = model_files
    lazy_base = _CountingLazy(base_path)
    lazy_experts = [_CountingLazy(p) for p in expert_paths]
    stream_merge(ties, lazy_base, lazy_experts, {}, tmp_path / "m.safetensors")
    for m in [lazy_base, *lazy_experts]:
        assert sorted(m.reads) == sorted(base)


def test_lazy_state_dict_reads_each_tensor_as_safetensors_does(tmp_path):
    """Tensors read lazily, one at a time, equal safe_open's, for every common dtype (and an empty
    tensor), keys in the same order; a truncated file is refused."""
    from safetensors import safe_open

    from mergesec.models.state_dict import LazyStateDict, read_tensor, save_state_dict

    g = torch.Generator().manual_seed(0)
    sd = {
        "z.f32": torch.randn(7, 5, generator=g),
        "a.f16": torch.randn(3, generator=g).half(),
        "m.bf16": torch.randn(4, 2, generator=g).bfloat16(),
        "b.f64": torch.randn(2, generator=g).double(),
        "i.i64": torch.arange(-3, 3),
        "i.i8": torch.tensor([-1, 2], dtype=torch.int8),
        "u.u8": torch.tensor([0, 255], dtype=torch.uint8),
        "t.bool": torch.tensor([True, False, True]),
        "e.empty": torch.empty(0, 4),
    }
    path = tmp_path / "m.safetensors"
    save_state_dict(sd, path, metadata={"format": "pt"})
    lazy = LazyStateDict(path)
    with safe_open(str(path), framework="pt") as f:
        assert list(lazy) == list(f.keys())  # noqa: SIM118
        for k in f.keys():  # noqa: SIM118
            want = f.get_tensor(k)
            got = lazy[k]
            assert got.dtype == want.dtype and got.shape == want.shape, k
            assert torch.equal(got, want), k
            assert lazy.shape(k) == tuple(want.shape)
            location = lazy.location(k)
            assert location is not None, k
            raw = lazy.read_into(k, torch.empty(location.nbytes, dtype=torch.uint8))
            assert raw.dtype == want.dtype and torch.equal(raw, want), k
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(Exception, match="(?i)incomplete|truncated|invalid"):
        for k in LazyStateDict(cut):
            LazyStateDict(cut)[k]
    # the raw reader refuses a short file too (the header read before the data was cut)
    location = lazy.location("z.f32")
    assert location is not None
    short = type(location)(cut, cut.stat().st_size - 4, location.nbytes, torch.float32, (7, 5))
    with pytest.raises(ValueError, match="ends inside"):
        read_tensor(short)


def test_streamed_reads_land_in_reused_buffers_that_ops_may_overwrite(model_files, tmp_path):
    """From files, each key's tensors are read into buffers of the merge's own (``owned``), so
    task arithmetic and TIES compute in place; buffers come back once the key is written and are
    reused by later keys of the same size; the output equals the in-memory merge bit for bit. From
    in-memory dicts nothing is owned and the caller's tensors are left as they were."""
    from mergesec.merging.per_key import owned

    base_path, expert_paths, base, experts = model_files
    seen: list[tuple[bool, set[int]]] = []

    def recording(op_fn):
        def fn(b, es, **params):
            seen.append((owned(b, *es), {t.data_ptr() for t in [*b.values()] if t.numel()}))
            return op_fn(b, es, **params)

        return fn

    for op_fn in (task_arithmetic, ties):
        seen.clear()
        out = tmp_path / f"{op_fn.__name__}.safetensors"
        lazy = [LazyStateDict(p) for p in expert_paths]
        stream_merge(recording(op_fn), LazyStateDict(base_path), lazy, {}, out)
        assert all(is_owned for is_owned, _ in seen)
        base_buffers = set().union(*(ptrs for _, ptrs in seen))
        assert len(base_buffers) < len(seen) - 2, "no buffer was reused from key to key"
        merged, expected = LazyStateDict(out), merge_in_memory(op_fn, base, experts, {})
        for k in base:
            assert torch.equal(merged[k], expected[k]), k

    before = [{k: v.clone() for k, v in e.items()} for e in experts]
    seen.clear()
    stream_merge(recording(task_arithmetic), base, experts, {}, tmp_path / "mem.safetensors")
    assert not any(is_owned for is_owned, _ in seen)
    for e, b in zip(experts, before, strict=True):
        assert all(torch.equal(e[k], b[k]) for k in e)


def test_read_buffers_keep_a_size_only_when_a_near_key_needs_it(tmp_path):
    from mergesec.merging.stream import ReadBuffers

    sd = {f"k{i}": torch.zeros(4 if i in (0, 1, 9) else 3) for i in range(10)}
    save_state_dict(sd, tmp_path / "m.safetensors")
    lazy = LazyStateDict(tmp_path / "m.safetensors")
    buffers = ReadBuffers([lazy], list(sd), window=3)
    first = buffers.read(lazy, "k0")
    assert buffers.lent("k0") == 1 and torch.equal(first, sd["k0"])
    buffers.give_back("k0")  # k1 (1 key on) reads 16 bytes: kept, and handed out again
    again = buffers.read(lazy, "k1")
    assert again.data_ptr() == first.data_ptr()
    buffers.give_back("k1")  # the next 16-byte read is k9, 8 keys on: dropped
    assert buffers.read(lazy, "k2").numel() == 3 and buffers.read(lazy, "k9").data_ptr() != (
        first.data_ptr()
    )
