"""Out-of-core merging: read, merge and write one tensor at a time.

``stream_merge`` calls a merge op (see ``merging.methods``) on one-key state dicts, so memory holds
one tensor of the base and of each expert plus the result, never whole models (and the next
key's inputs, which a small thread pool reads while the current key is merged). Output goes to
safetensors files written sequentially: the header is computed up front from the base's shapes
and dtypes (an op returns the base's shape and dtype for every key), then each merged tensor's
bytes are appended as soon as it is computed. With ``max_shard_bytes`` the output is split into
``<stem>-00001-of-0000N.safetensors`` shards plus a Hugging Face style
``<name>.index.json``; ``merged_files`` lists the files for ``LazyStateDict``.
"""

from __future__ import annotations

import bisect
import json
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from mergesec.merging.per_key import OwnedTensors
from mergesec.models.state_dict import (
    SAFETENSORS_DTYPES,
    LazyStateDict,
    StateDict,
    read_safetensors_entries,
)

MergeFn = Callable[..., StateDict]

_ST_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


@dataclass
class MergeStats:
    """What a streaming merge did: tensors and bytes written, the most tensor bytes held at once
    by the loop (the inputs of one key plus its result; an op's temporaries and the next key's
    inputs, read ahead, are not counted), the files written and the wall time."""

    tensors: int = 0
    bytes_written: int = 0
    peak_tensor_bytes: int = 0
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def read_safetensors_header(path: str | Path) -> dict[str, TensorSpec]:
    """Dtypes and shapes of the tensors in a safetensors file, from its header alone."""
    _, entries = read_safetensors_entries(path)
    return {
        k: TensorSpec(SAFETENSORS_DTYPES[v["dtype"]], tuple(v["shape"])) for k, v in entries.items()
    }


def tensor_specs(
    state: Mapping[str, Tensor], keys: Iterable[str] | None = None
) -> dict[str, TensorSpec]:
    """Dtype and shape of each key, read from file headers for a ``LazyStateDict``."""
    if isinstance(state, LazyStateDict):
        specs: dict[str, TensorSpec] = {}
        for p in state.paths:
            specs.update(read_safetensors_header(p))
        wanted = list(state) if keys is None else list(keys)
        return {k: specs[k] for k in wanted if k in specs}
    names = set(state)
    wanted = list(state) if keys is None else [k for k in keys if k in names]
    out = {}
    for k in wanted:
        t = state[k]  # one tensor at a time for other lazy mappings
        out[k] = TensorSpec(t.dtype, tuple(t.shape))
    return out


def check_compatible(
    base: Mapping[str, Tensor],
    experts: Sequence[Mapping[str, Tensor]],
    keys: Iterable[str] | None = None,
) -> dict[str, TensorSpec]:
    """Check that every expert has the merged keys with the base's shapes; return base specs.

    With ``keys=None`` the experts must have exactly the base's keys. Raises ``ValueError``
    naming the first offending key and both shapes.
    """
    if not experts:
        raise ValueError("merging needs at least one expert")
    # Membership on sets of names: ``k in lazy_mapping`` would read the tensor.
    base_keys = set(base)
    key_list = list(base) if keys is None else list(keys)
    missing = [k for k in key_list if k not in base_keys]
    if missing:
        raise ValueError(f"key {missing[0]!r} is not in the base model")
    base_specs = tensor_specs(base, key_list)
    for i, e in enumerate(experts):
        if keys is None:
            extra = [k for k in e if k not in base_keys]
            if extra:
                raise ValueError(f"key {extra[0]!r}: expert {i} has it, the base model does not")
        specs = tensor_specs(e, key_list)
        for k in key_list:
            if k not in specs:
                raise ValueError(
                    f"key {k!r}: expert {i} does not have it, base has shape {base_specs[k].shape}"
                )
            if specs[k].shape != base_specs[k].shape:
                raise ValueError(
                    f"key {k!r}: expert {i} has shape {specs[k].shape}, base has {base_specs[k].shape}"
                )
    return base_specs


class SafetensorsWriter:
    """Writes one safetensors file sequentially: header from known specs, then tensor bytes in
    the same order, so no tensor is kept after it is written."""

    def __init__(
        self,
        path: Path,
        specs: Sequence[tuple[str, TensorSpec]],
        metadata: Mapping[str, str] | None = None,
    ):
        if sys.byteorder != "little":
            raise RuntimeError("safetensors are little-endian; this writer does not byte-swap")
        header: dict[str, Any] = {}
        offset = 0
        for key, spec in specs:
            header[key] = {
                "dtype": _ST_DTYPES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        if metadata:
            header["__metadata__"] = dict(metadata)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path = path
        self.data_bytes = offset
        self._pending = list(reversed(specs))
        self._f: BinaryIO = open(path, "wb")  # noqa: SIM115 (closed in close())
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)

    def write(self, key: str, tensor: Tensor) -> int:
        if not self._pending:
            raise ValueError(f"{self.path.name}: unexpected tensor {key!r}")
        want_key, spec = self._pending.pop()
        if key != want_key or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"{self.path.name}: expected {want_key!r} {spec.dtype} {spec.shape}, "
                f"got {key!r} {tensor.dtype} {tuple(tensor.shape)}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._f.write(data.data)
        return spec.nbytes

    def close(self) -> None:
        self._f.close()
        if self._pending:
            raise ValueError(f"{self.path.name}: {len(self._pending)} tensors were never written")

    def abort(self) -> None:
        self._f.close()
        self.path.unlink(missing_ok=True)


def _plan_shards(
    specs: Sequence[tuple[str, TensorSpec]], max_shard_bytes: int | None
) -> list[list[tuple[str, TensorSpec]]]:
    shards: list[list[tuple[str, TensorSpec]]] = [[]]
    size = 0
    for key, spec in specs:
        if max_shard_bytes is not None and shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, spec))
        size += spec.nbytes
    return shards


def _index_path(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".index.json")


def merged_files(out_path: str | Path) -> list[Path]:
    """The safetensors files written by ``stream_merge(..., out_path)``, in order."""
    out_path = Path(out_path)
    index = _index_path(out_path)
    if index.exists():
        names = json.loads(index.read_text())["weight_map"].values()
        return [out_path.with_name(n) for n in sorted(set(names))]
    return [out_path]


READERS = 4  # threads reading the experts' tensors ahead of the merge
REUSE_WINDOW = 16  # keys ahead within which a read buffer of the same size is kept for reuse


class ReadBuffers:
    """Byte buffers for one pass over ``keys``, lent to the readers of ``LazyStateDict`` sources
    and reused from key to key.

    A fresh buffer costs a page fault per page, which under memory pressure also makes the kernel
    evict page cache first; reusing buffers pays that once per size. A buffer given back is kept
    when a key among the next ``window`` reads a tensor of its size (a transformer's layers repeat
    theirs), else dropped, so memory holds the buffers of the keys in flight plus those about to be
    reused.
    """

    def __init__(
        self,
        sources: Sequence[Mapping[str, Tensor]],
        keys: Iterable[str],
        *,
        window: int = REUSE_WINDOW,
    ):
        self._position: dict[str, int] = {}
        self._needs: dict[int, list[int]] = {}  # size -> positions of the keys reading one
        for position, key in enumerate(keys):
            self._position[key] = position
            for source in sources:
                location = source.location(key) if isinstance(source, LazyStateDict) else None
                if location is not None:
                    needs = self._needs.setdefault(location.nbytes, [])
                    if not needs or needs[-1] != position:
                        needs.append(position)
        self._free: dict[int, list[Tensor]] = {}
        self._lent: dict[str, list[Tensor]] = {}
        self._lock = threading.Lock()
        self.window = window

    def read(self, source: Mapping[str, Tensor], key: str) -> Tensor:
        """``source[key]``, read into a lent buffer where ``source`` is a ``LazyStateDict``."""
        if not isinstance(source, LazyStateDict) or (location := source.location(key)) is None:
            return source[key]
        return source.read_into(key, self._take(key, location.nbytes))

    def _take(self, key: str, nbytes: int) -> Tensor:
        with self._lock:
            free = self._free.get(nbytes)
            buffer = free.pop() if free else None
        if buffer is None:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
        with self._lock:
            self._lent.setdefault(key, []).append(buffer)
        return buffer

    def lent(self, key: str) -> int:
        """How many of ``key``'s tensors were read into lent buffers."""
        with self._lock:
            return len(self._lent.get(key, ()))

    def give_back(self, key: str) -> None:
        """Take back ``key``'s buffers: nothing may use its tensors afterwards."""
        position = self._position[key]
        with self._lock:
            for buffer in self._lent.pop(key, ()):
                needs = self._needs.get(buffer.numel(), [])
                i = bisect.bisect_right(needs, position)
                if i < len(needs) and needs[i] <= position + self.window:
                    self._free.setdefault(buffer.numel(), []).append(buffer)


def read_ahead(
    sources: Sequence[Mapping[str, Tensor]],
    keys: Iterable[str],
    *,
    readers: int = READERS,
    ahead: int = 1,
    buffers: ReadBuffers | None = None,
) -> Iterator[tuple[str, list[Tensor]]]:
    """``(key, [source[key] for source in sources])`` for each key in order, reading the next
    ``ahead`` keys' tensors in a pool of ``readers`` threads while the caller uses this one.

    With ``buffers``, tensors of ``LazyStateDict`` sources are read into its buffers, which the
    caller gives back (``ReadBuffers.give_back``) once done with the key. Memory holds at most
    ``ahead + 1`` keys' tensors of every source.
    """
    read = buffers.read if buffers is not None else (lambda s, k: s[k])
    it = iter(keys)
    pending: deque[tuple[str, list[Future[Tensor]]]] = deque()
    with ThreadPoolExecutor(max(1, readers), thread_name_prefix="merge-read") as pool:

        def submit() -> None:
            key = next(it, None)
            if key is not None:
                pending.append((key, [pool.submit(read, s, key) for s in sources]))

        for _ in range(ahead + 1):
            submit()
        try:
            while pending:
                key, futures = pending.popleft()
                tensors = [f.result() for f in futures]
                submit()
                yield key, tensors
        finally:
            for _, futures in pending:
                for f in futures:
                    f.cancel()


def write_stream(
    specs: Mapping[str, TensorSpec],
    tensors: Iterable[tuple[str, Tensor]],
    out_path: str | Path,
    *,
    max_shard_bytes: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> MergeStats:
    """Write ``tensors`` (in the order of ``specs``, with their dtypes and shapes) as they come,
    into one safetensors file or shards with an index (see ``stream_merge``)."""
    started = time.perf_counter()
    out_path = Path(out_path)
    shards = _plan_shards(list(specs.items()), max_shard_bytes)
    if len(shards) == 1:
        paths = [out_path]
    else:
        stem = out_path.name.removesuffix(".safetensors")
        n = len(shards)
        paths = [out_path.with_name(f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors") for i in range(n)]
    stats = MergeStats(files=paths)
    written: list[SafetensorsWriter] = []
    source = iter(tensors)
    try:
        for path, shard in zip(paths, shards, strict=True):
            writer = SafetensorsWriter(path, shard, metadata)
            written.append(writer)
            for _ in shard:
                key, tensor = next(source)
                stats.bytes_written += writer.write(key, tensor)
                stats.tensors += 1
                del tensor
            writer.close()
        if len(paths) > 1:
            index = {
                "metadata": {"total_size": stats.bytes_written, **(metadata or {})},
                "weight_map": {
                    k: p.name for p, shard in zip(paths, shards, strict=True) for k, _ in shard
                },
            }
            _index_path(out_path).write_text(json.dumps(index, indent=2))
    except BaseException:
        for w in written:
            w.abort()
        raise
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()
    stats.seconds = time.perf_counter() - started
    return stats


def stream_merge(
    op_fn: MergeFn,
    base: Mapping[str, Tensor],
    experts: Sequence[Mapping[str, Tensor]],
    params: dict[str, Any],
    out_path: str | Path,
    *,
    keys: Iterable[str] | None = None,
    max_shard_bytes: int | None = None,
    metadata: Mapping[str, str] | None = None,
    readers: int = READERS,
) -> MergeStats:
    """Merge tensor by tensor with ``op_fn(base_1, [expert_1, ...], **params)`` on one-key dicts.

    ``base`` and ``experts`` are usually ``LazyStateDict``s; the next key's tensors are read by
    ``readers`` threads (into buffers reused from key to key, which the op may compute in: see
    ``OwnedTensors``) while the current key is merged, and each result is written as soon as it
    is computed. The output holds exactly ``keys`` (default: every key of ``base``) in the base's
    dtypes and shapes, in one file at ``out_path`` or, when ``max_shard_bytes`` is set and
    exceeded, in shards beside it with an index file. On an error, files written by this call are
    removed.
    """
    specs = check_compatible(base, experts, keys)
    sources = [base, *experts]
    buffers = ReadBuffers(sources, specs)
    peak = [0]

    def merged() -> Iterator[tuple[str, Tensor]]:
        for key, (b, *ts) in read_ahead(sources, specs, readers=readers, buffers=buffers):
            state = OwnedTensors if buffers.lent(key) == len(sources) else dict
            out = op_fn(state({key: b}), [state({key: t}) for t in ts], **params)[key]
            held = _nbytes(b) + sum(_nbytes(t) for t in ts) + _nbytes(out)
            peak[0] = max(peak[0], held)
            del b, ts
            yield key, out  # written when this resumes
            del out
            buffers.give_back(key)

    stats = write_stream(
        specs, merged(), out_path, max_shard_bytes=max_shard_bytes, metadata=metadata
    )
    stats.peak_tensor_bytes = peak[0]
    return stats


def merge_in_memory(
    op_fn: MergeFn,
    base: Mapping[str, Tensor],
    experts: Sequence[Mapping[str, Tensor]],
    params: dict[str, Any],
    *,
    keys: Iterable[str] | None = None,
) -> StateDict:
    """Merge whole state dicts at once (for coefficient searches on small models); same
    checks and the same result as ``stream_merge``."""
    key_list = list(check_compatible(base, experts, keys))
    b = {k: base[k] for k in key_list}
    es = [{k: e[k] for k in key_list} for e in experts]
    return op_fn(b, es, **params)
