"""Batched greedy decoding with a key/value cache, through any forward function.

The forward function is called like a causal LM's ``forward`` (``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values``, ``use_cache``), so the same loop decodes a plain model and
a model evaluated through ``functional_call`` parameter overrides (scale curves, merge search).
Prompts are left-padded; position ids follow the attention mask, as ``generate`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

ForwardFn = Callable[..., object]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)`` of prompts left-padded to the longest."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def greedy_generate(
    forward: ForwardFn,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    device: str = "cpu",
    batch_size: int = 32,
    last_logits_only: bool = False,
) -> list[list[int]]:
    """The greedy continuation of each prompt (token ids, up to and excluding the first EOS).

    ``last_logits_only``: ``forward`` takes ``logits_to_keep``, so the prompt's pass computes the
    last position's logits only (the LM head is a fifth of a small LM's prompt pass)."""
    extra = {"logits_to_keep": 1} if last_logits_only else {}
    out: list[list[int]] = []
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[start : start + batch_size], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        n = ids.shape[0]
        done = torch.zeros(n, dtype=torch.bool, device=device)
        gen = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)
        step_ids, past = ids, None
        for t in range(max_new_tokens):
            res = forward(
                input_ids=step_ids, attention_mask=mask, position_ids=pos,
                past_key_values=past, use_cache=True, **extra,
            )  # fmt: skip
            past = res.past_key_values
            nxt = res.logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            gen[:, t] = nxt
            done |= torch.isin(nxt, eos)
            if bool(done.all()):
                break
            step_ids = nxt[:, None]
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
            pos = pos[:, -1:] + 1
        for row in gen.tolist():
            cut = next((i for i, tok in enumerate(row) if tok in set(eos_ids)), None)
            row = row[:cut] if cut is not None else row
            out.append(row)
    return out
