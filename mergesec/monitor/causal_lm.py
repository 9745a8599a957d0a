"""WeightWatch on Hugging Face causal LMs (llama-style and GPT-2 decoders): directions, role masks,
calibration, detection, sticky steering in ``generate()`` and auditing.

The pieces compose the released method:

1. ``causal_lm_directions(base, tuned)``: top-k left singular vectors of ΔW for every layer's
   attention-output and MLP-output projection, found through the family's ``TransformerLayout``
   (GPT-2's transposed Conv1D weights are handled there).
2. ``encode_chats``: a conversation through the tokenizer's chat template, with each token's role
   (0 = user, 1 = assistant) from re-templating growing prefixes; plain strings, or a tokenizer
   without a chat template, give no role mask and unsplit scores.
3. ``calibrate_chats``: benign conversations get a few tokens of the model's own reply as the
   assistant turn (so assistant ranges reflect what the model writes), are scored with user and
   assistant tokens in separate columns, and fit a ``Calibration``.
4. ``score_chats``/``detect_chats``: per conversation, min and max token cosine per direction and
   role; flagged when any active column leaves its benign range.
5. ``steered_generate``: ``generate()`` under sticky ``SteeringHooks``: the prompt is checked
   against user-role ranges, generated tokens against assistant-role ranges, and a direction,
   once out of range at a token, is projected out of that token and every later one.
6. ``watch_chats``: false and true positive rates, attack success before and after steering and
   how many benign replies steering leaves unchanged; ``audit_chats``: the conversations that
   drive each direction hardest.

What is read is the output of every decoder block (``layout.block_modules``), i.e. the pre-norm
residual stream after the layer, for the last block too (``output_hidden_states`` would give the
final-norm output there); steering acts on the same tensors.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mergesec.models.functional import takes_logits_to_keep
from mergesec.models.layout import TransformerLayout, layout_for_model
from mergesec.monitor.audit import Audit, top_activating, write_audit_markdown
from mergesec.monitor.directions import Directions, weight_directions
from mergesec.monitor.scoring import ROLE_NAMES, Calibration, DirectionScores, score_inputs
from mergesec.monitor.steering import SteeringHooks

Message = Mapping[str, str]
Chat = Sequence[Message] | str
USER, ASSISTANT = 0, 1


def _state_dict(model: nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    return model.state_dict() if isinstance(model, nn.Module) else model


def causal_lm_directions(
    base: nn.Module | Mapping[str, torch.Tensor],
    tuned: nn.Module,
    *,
    k: int = 20,
    method: str = "exact",
    layout: TransformerLayout | None = None,
    **options: Any,
) -> Directions:
    """WeightWatch directions of a fine-tuned causal LM against its parent.

    ``base`` is the parent model (or its state dict, same key names as ``tuned``); ``tuned`` the
    fine-tuned model (a peft model should be merged first: ``merge_and_unload()``). ``options``
    go to ``weight_directions`` (``oversample``, ``n_iter``, ``seed``, tolerances).
    """
    layout = layout or layout_for_model(tuned)
    return weight_directions(
        layout.residual_writer_weights(_state_dict(base)),
        layout.residual_writer_weights(tuned.state_dict()),
        k=k,
        method=method,
        num_layers=layout.num_layers,
        **options,
    )


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
    )


def role_token_mask(
    tokenizer,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = False,
    max_length: int | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of the templated conversation and each token's role (0 user, 1 assistant).

    As in the released WeightWatch code, the template is rendered for growing prefixes of the
    conversation, each with the generation prompt; the text that prefix ``i`` adds takes message
    ``i``'s role (``assistant`` → 1, anything else, ``system`` included, → 0). So the assistant
    header that follows a user turn counts as user, and a prompt ending in the generation prompt
    is all user tokens: at generation time the whole prompt is checked against user ranges and
    only generated tokens against assistant ranges. Tokens are placed by character offsets (a
    fast tokenizer is needed): a token belongs to the first message whose rendering (its longest
    common prefix with the whole) it ends within, so templates whose prefixes are not exact
    prefixes of the whole still split. The text is
    tokenized without adding special tokens, as ``apply_chat_template(tokenize=True)`` does.
    """
    if not messages:
        raise ValueError("a conversation needs at least one message")
    full = _render(tokenizer, messages, add_generation_prompt)
    bounds: list[tuple[int, int]] = []  # (end character, role) per message
    for i in range(len(messages)):
        prefix = _render(tokenizer, messages[: i + 1], True)
        end = len(os.path.commonprefix([prefix, full]))
        role = ASSISTANT if messages[i].get("role") == "assistant" else USER
        bounds.append((end, role))
    tail_role = bounds[-1][1]
    enc = tokenizer(
        full,
        add_special_tokens=False,
        return_offsets_mapping=True,
        truncation=max_length is not None,
        max_length=max_length,
    )
    roles = []
    for _, stop in enc["offset_mapping"]:
        # A token straddling a boundary belongs to the later message: renderings can share a
        # few characters past the true boundary ("<assistant>" vs "<user>" share "<").
        roles.append(next((r for end, r in bounds if stop <= end), tail_role))
    return list(enc["input_ids"]), roles


def encode_chats(
    tokenizer,
    chats: Sequence[Chat],
    *,
    add_generation_prompt: bool = False,
    split_roles: bool | None = None,
    max_length: int = 512,
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """A padded batch (``input_ids``, ``attention_mask`` and, when roles are split, ``role_mask``).

    Each chat is a list of ``{"role", "content"}`` messages (rendered with the chat template) or
    a plain string (tokenized as it is, with special tokens). ``split_roles`` defaults to whether
    the tokenizer has a chat template; it needs message lists. Padding tokens get role 0 and
    attention 0 (they are never read). ``padding_side="left"`` is for ``generate()``.
    """
    split = has_chat_template(tokenizer) if split_roles is None else split_roles
    ids: list[list[int]] = []
    roles: list[list[int]] = []
    for chat in chats:
        if isinstance(chat, str):
            if split:
                raise ValueError("role-split scoring needs conversations (lists of messages)")
            ids.append(list(tokenizer(chat, truncation=True, max_length=max_length)["input_ids"]))
            continue
        if not has_chat_template(tokenizer):
            raise ValueError("the tokenizer has no chat template to render conversations with")
        t, r = role_token_mask(
            tokenizer, chat, add_generation_prompt=add_generation_prompt, max_length=max_length
        )
        ids.append(t)
        roles.append(r)
    if not ids:
        raise ValueError("no chats to encode")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    role_mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, t in enumerate(ids):
        sl = slice(width - len(t), width) if padding_side == "left" else slice(0, len(t))
        input_ids[i, sl] = torch.tensor(t, dtype=torch.long)
        mask[i, sl] = 1
        if split:
            role_mask[i, sl] = torch.tensor(roles[i], dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": mask}
    if split:
        out["role_mask"] = role_mask
    return out


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _lm_batch(enc: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    batch = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
    # Left-padded rows need positions counted from their first real token.
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    return batch


@torch.no_grad()
def score_chats(
    model: nn.Module,
    tokenizer,
    directions: Directions,
    chats: Sequence[Chat],
    *,
    split_roles: bool | None = None,
    batch_size: int = 8,
    max_length: int = 512,
    layout: TransformerLayout | None = None,
) -> DirectionScores:
    """Per chat, the min and max token cosine along every direction (per role when split).

    States are read at each decoder block's output (see the module docstring).
    """
    blocks = (layout or layout_for_model(model)).block_modules(model)
    device = _device(model)
    # The scores are read at the blocks' outputs: the LM head needs to run for one position only.
    head = {"logits_to_keep": 1} if takes_logits_to_keep(model) else {}
    # Chats of similar length share a batch (less padding); the scores come back in input order.
    order = sorted(range(len(chats)), key=lambda j: _text_length(chats[j]))
    parts = []
    for i in range(0, len(chats), batch_size):
        enc = encode_chats(
            tokenizer, [chats[j] for j in order[i : i + batch_size]], split_roles=split_roles,
            max_length=max_length,
        )  # fmt: skip
        parts.append(
            score_inputs(
                model,
                _lm_batch(enc, device) | head,
                directions,
                blocks=blocks,
                role_mask=enc.get("role_mask"),
            )
        )
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return DirectionScores.cat(parts).subset(inverse)


def _text_length(chat: Chat) -> int:
    """Characters of a chat's messages (or of a plain prompt): its length for batching."""
    return len(chat) if isinstance(chat, str) else sum(len(m["content"]) for m in chat)


def _generation_ids(tokenizer, model: nn.Module) -> dict[str, Any]:
    pad = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    return {
        "pad_token_id": pad if pad is not None else (eos if eos is not None else 0),
        "eos_token_id": eos
        if eos is not None
        else getattr(model.generation_config, "eos_token_id", None),
    }


@torch.no_grad()
def complete_chats(
    model: nn.Module,
    tokenizer,
    conversations: Sequence[Sequence[Message]],
    *,
    max_new_tokens: int = 3,
    do_sample: bool = True,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    max_length: int = 512,
) -> list[list[dict[str, str]]]:
    """Each conversation (ending with a user turn) plus an assistant turn the model writes.

    WeightWatch calibrates on a few sampled tokens of the model's own reply so that
    assistant-role ranges reflect its outputs; the reply is decoded to text and appended.
    """
    device = _device(model)
    torch.manual_seed(seed)
    out: list[list[dict[str, str]]] = []
    for i in range(0, len(conversations), batch_size):
        chunk = conversations[i : i + batch_size]
        enc = encode_chats(
            tokenizer, chunk, add_generation_prompt=True, max_length=max_length, padding_side="left"
        )
        batch = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
        gen = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_k=None,
            top_p=None,
            **_generation_ids(tokenizer, model),
        )
        new = gen[:, batch["input_ids"].shape[1] :]
        for conv, row in zip(chunk, new, strict=True):
            text = tokenizer.decode(row, skip_special_tokens=True).strip()
            out.append([dict(m) for m in conv] + [{"role": "assistant", "content": text}])
    return out


def calibrate_chats(
    model: nn.Module,
    tokenizer,
    directions: Directions,
    conversations: Sequence[Sequence[Message]],
    *,
    generate_tokens: int = 3,
    trim_percentile: float = 0.0,
    epsilon: float = 0.01,
    drop_last_layers: int = 3,
    seed: int = 0,
    batch_size: int = 8,
    max_length: int = 512,
) -> Calibration:
    """The benign ranges from conversations of users' turns, completed by the model.

    ``generate_tokens`` sampled tokens of the model's reply are appended as the assistant turn
    (0 keeps the conversations as they are). Roles are split when the tokenizer has a chat
    template. Defaults follow the released code: ε = 0.01, the last three layers dropped.
    """
    chats = (
        complete_chats(
            model,
            tokenizer,
            conversations,
            max_new_tokens=generate_tokens,
            seed=seed,
            batch_size=batch_size,
            max_length=max_length,
        )
        if generate_tokens > 0
        else [list(c) for c in conversations]
    )
    scores = score_chats(
        model, tokenizer, directions, chats, batch_size=batch_size, max_length=max_length
    )
    return Calibration.fit(
        scores,
        trim_percentile=trim_percentile,
        epsilon=epsilon,
        drop_last_layers=drop_last_layers,
    )


def detect_chats(
    model: nn.Module,
    tokenizer,
    directions: Directions,
    calibration: Calibration,
    chats: Sequence[Chat],
    *,
    batch_size: int = 8,
    max_length: int = 512,
) -> torch.Tensor:
    """``[n_chats]`` bool: whether any active direction (and role) leaves its benign range."""
    split = bool(calibration.columns.role_names)
    scores = score_chats(
        model,
        tokenizer,
        directions,
        chats,
        split_roles=split,
        batch_size=batch_size,
        max_length=max_length,
    )
    return calibration.detect(scores)


@torch.no_grad()
def steered_generate(
    model: nn.Module,
    tokenizer,
    directions: Directions,
    calibration: Calibration,
    chats: Sequence[Chat],
    *,
    max_new_tokens: int = 20,
    sticky: bool = True,
    scope: str = "sequence",
    only: Sequence[str] | None = None,
    max_length: int = 512,
    **generate_kwargs: Any,
) -> tuple[torch.Tensor, list[list[str]]]:
    """``generate()`` with out-of-range directions projected out of the residual stream.

    Conversations get the generation prompt; the batch is left-padded and padding never
    triggers. With a role-split calibration the prompt (prefill) is checked against user-role
    ranges (the prompt is all user tokens, see ``role_token_mask``) and generated tokens against
    assistant-role ranges. ``sticky`` keeps a triggered
    direction removed for the rest of that sequence: with ``scope="sequence"`` (the released
    code) from the whole prompt on, with ``"from_trigger"`` from the token where it fired on
    (see ``SteeringHooks``). Returns the new
    token ids ``[batch, new]`` and, per sequence, the names of the directions removed.
    """
    layout = layout_for_model(model)
    blocks = layout.block_modules(model)
    enc = encode_chats(
        tokenizer,
        chats,
        add_generation_prompt=True,
        split_roles=False,
        max_length=max_length,
        padding_side="left",
    )
    device = _device(model)
    batch = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
    kwargs = {"do_sample": False, **_generation_ids(tokenizer, model), **generate_kwargs}
    hooks = SteeringHooks.from_calibration(
        blocks, directions, calibration, sticky=sticky, only=only, scope=scope
    )
    with hooks:
        hooks.set_token_mask(batch["attention_mask"])
        gen = model.generate(**batch, max_new_tokens=max_new_tokens, **kwargs)
        names: list[list[str]] = [[] for _ in range(batch["input_ids"].shape[0])]
        for layer, rows in sorted(hooks.triggered().items()):
            for b, r in rows.nonzero().tolist():
                names[b].append(hooks.names[layer][r])
    return gen[:, batch["input_ids"].shape[1] :], names


def chat_text(chat: Chat) -> str:
    """A conversation as one line for reading: ``role: content`` turns joined by `` | ``."""
    if isinstance(chat, str):
        return chat
    return " | ".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in chat)


def audit_chats(
    model: nn.Module,
    tokenizer,
    directions: Directions,
    chats: Sequence[Chat],
    *,
    calibration: Calibration | None = None,
    names: Sequence[str] | None = None,
    audit_directions: int = 8,
    n: int = 5,
    path: str | os.PathLike[str] | None = None,
    batch_size: int = 8,
    max_length: int = 512,
) -> Audit:
    """Per direction (and role), the ``n`` chats that drive it highest and lowest.

    Columns are ``names`` when given; else, with a ``calibration``, the ``audit_directions``
    active columns that flag the most of ``chats`` (scores split by role as the calibration is);
    else every column. With ``path`` the audit is also written as Markdown there.
    """
    split = bool(calibration.columns.role_names) if calibration is not None else None
    scores = score_chats(
        model,
        tokenizer,
        directions,
        chats,
        split_roles=split,
        batch_size=batch_size,
        max_length=max_length,
    )
    if names is None and calibration is not None:
        counts = calibration.flags(scores).sum(0)
        order = sorted(
            (j for j in range(len(counts)) if bool(calibration.active[j])),
            key=lambda j: -int(counts[j]),
        )
        names = [calibration.columns.names[j] for j in order[:audit_directions]]
    audit = top_activating(scores, [chat_text(c) for c in chats], n=n, names=names)
    if path is not None:
        write_audit_markdown(audit, path, title="Weight-direction audit (chat)")
    return audit


def _replies(tokenizer, ids: torch.Tensor) -> list[str]:
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def watch_chats(
    model: nn.Module,
    tokenizer,
    directions: Directions,
    calibration: Calibration,
    benign_prompts: Sequence[Sequence[Message]],
    triggered_prompts: Sequence[Sequence[Message]],
    attack_succeeded: Callable[[str], bool],
    *,
    max_new_tokens: int = 20,
    batch_size: int = 8,
    max_length: int = 512,
) -> dict[str, float]:
    """The classifier monitor's measurements for a chat model, from greedy replies.

    Detection is marked inference: the model answers each prompt, then prompt and answer are
    scored (``monitor/fpr`` on benign prompts, ``monitor/tpr`` on triggered ones).
    ``attack_succeeded(reply)`` says whether a reply shows the backdoor's behaviour:
    ``monitor/asr_before`` without steering, ``monitor/asr_after`` with ``steered_generate``.
    ``monitor/benign_unchanged`` is the share of benign replies that steering leaves exactly as
    they were (the chat analogue of clean accuracy after steering); ``monitor/steered_*`` the
    share of prompts where steering removed any direction.
    """
    run = dict(batch_size=batch_size, max_length=max_length)
    greedy = dict(max_new_tokens=max_new_tokens, do_sample=False, **run)
    benign = complete_chats(model, tokenizer, benign_prompts, **greedy)
    triggered = complete_chats(model, tokenizer, triggered_prompts, **greedy)
    flag_b = detect_chats(model, tokenizer, directions, calibration, benign, **run)
    flag_t = detect_chats(model, tokenizer, directions, calibration, triggered, **run)
    steer = dict(max_new_tokens=max_new_tokens, max_length=max_length)
    new_t, names_t = steered_generate(
        model, tokenizer, directions, calibration, triggered_prompts, **steer
    )
    new_b, names_b = steered_generate(
        model, tokenizer, directions, calibration, benign_prompts, **steer
    )
    after_b = _replies(tokenizer, new_b)

    def share(xs: Sequence[bool]) -> float:
        return sum(map(bool, xs)) / len(xs) if xs else float("nan")

    return {
        "monitor/fpr": share(flag_b.tolist()),
        "monitor/tpr": share(flag_t.tolist()),
        "monitor/asr_before": share([attack_succeeded(c[-1]["content"]) for c in triggered]),
        "monitor/asr_after": share([attack_succeeded(r) for r in _replies(tokenizer, new_t)]),
        "monitor/benign_unchanged": share(
            [a == c[-1]["content"] for a, c in zip(after_b, benign, strict=True)]
        ),
        "monitor/steered_benign": share([bool(n) for n in names_b]),
        "monitor/steered_triggered": share([bool(n) for n in names_t]),
    }


__all__ = [
    "ASSISTANT",
    "ROLE_NAMES",
    "USER",
    "audit_chats",
    "calibrate_chats",
    "causal_lm_directions",
    "chat_text",
    "complete_chats",
    "detect_chats",
    "encode_chats",
    "has_chat_template",
    "role_token_mask",
    "score_chats",
    "steered_generate",
    "watch_chats",
]
