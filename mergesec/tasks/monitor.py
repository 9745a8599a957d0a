"""The monitor step: WeightWatch on a classifier in the store (an expert, a release or a merge).

``monitor/weightwatch`` takes the top-k left singular vectors of ``ΔW = backbone − base`` for each
residual writer (every layer's attention-output and MLP-output projection, found through the
family's ``TransformerLayout``), learns the benign range of token cosines along them on clean
calibration texts, and then, on the victim dataset's clean test split and, when the scenario
poisons the victim, on triggered copies of its non-target test examples, reports

- ``monitor/fpr``: share of clean test inputs flagged (any active direction out of range);
- ``monitor/tpr``: share of triggered inputs flagged (``monitor/tpr_successful``: among those the
  backdoor flips to the target label);
- ``monitor/asr_before``/``monitor/asr_after``: share of triggered inputs classified as the target
  without and with steering (``monitor/target_rate_clean``: the same share on the clean non-target
  inputs, the floor an attack success rate is compared with);
- ``monitor/clean_accuracy_before``/``monitor/clean_accuracy_after``: test accuracy without and
  with steering;
- with ``control_trigger``, ``monitor/control_flag_rate``: share of the same non-target inputs
  flagged when another text of the trigger's kind is inserted instead (flags on any odd insertion
  versus flags on the trigger);

and writes ``directions.safetensors``, ``calibration.safetensors`` (reloadable with
``Directions.load``/``Calibration.load``), ``audit.md``/``audit.json`` (the inputs that drive the
most-flagging directions hardest) and ``monitor.json`` (per-direction flag counts) into the node.

What is read: the output of every transformer block (``layout.block_modules``), i.e. the residual
stream after the layer, which is where steering acts too. For post-LN encoders (BERT, MiniLM) the
block output is its last LayerNorm, ``LN(h + MLP(h))``, so the cosines are those of the normalised
stream that the next layer reads, not of the pre-norm sum the writers add to; for pre-LN decoders
it is the raw residual sum. Steering (``steering="gated"``) removes, per input, the directions
whose cosine leaves the calibrated range anywhere in that input from all its tokens (WeightWatch's
clipped inference, applied to a bidirectional encoder). ``"quarantine"`` removes from every input
each direction that left its range on any evaluated input (clean or triggered), as a running
monitor that keeps what it has seen fire switched off would; ``"all"`` removes every active
direction from every input, an ablation baseline.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import nn

from mergesec.core.bounds import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    Seed,
    TokenLength,
    TrimPercentile,
)
from mergesec.core.context import NodeContext
from mergesec.core.registry import get_op, register_op
from mergesec.data import dataset_slug, triggered_copy
from mergesec.data.splits import DatasetSplits, Example
from mergesec.kinds.chat import ChatKind
from mergesec.kinds.text import TextKind, tokenized_batches
from mergesec.models.artifact import ModelArtifact
from mergesec.models.classifier import SequenceClassifier
from mergesec.models.hub import base_weights_file, load_config
from mergesec.models.layout import detect_layout
from mergesec.models.state_dict import LazyStateDict
from mergesec.monitor.audit import Audit, top_activating, write_audit_markdown
from mergesec.monitor.directions import Directions, WriterWeights, weight_directions
from mergesec.monitor.scoring import (
    Calibration,
    DirectionScores,
    direction_cosines,
    epsilon_for_fpr,
    score_inputs,
)
from mergesec.monitor.steering import SteeringHooks
from mergesec.tasks._io import node_kind
from mergesec.tasks.monitor_chat import split_pool, watch_chat
from mergesec.training.batch import to_device
from mergesec.training.sampling import fixed_subset


@dataclass
class WatchResult:
    """What ``weightwatch`` found: metrics, the fitted monitor, the audit and per-direction facts."""

    metrics: dict[str, float]
    directions: Directions
    calibration: Calibration
    audit: Audit
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScoredPass:
    """One pass over examples: direction scores, predicted labels, and which inputs were steered."""

    scores: DirectionScores
    predictions: torch.Tensor
    steered: torch.Tensor  # per input: whether steering removed anything


def calibration_texts(
    splits: DatasetSplits,
    *,
    split: str = "train+validation",
    size: int | None = None,
    datasets: Sequence[str | Mapping[str, Any]] = (),
    seed: int = 0,
    include_victim: bool = True,
) -> list[str]:
    """Benign texts: the victim dataset's ``split`` (``train``, ``validation`` or both joined by
    ``+``; left out when ``include_victim`` is false), then the same split of each of
    ``datasets`` (URIs, or ``{uri, columns, examples}`` as in a study's dataset list), each
    dataset capped at a seeded sample of ``size`` texts (``None``: all). Labels are not used.

    Texts come straight from the datasets: poisoning happens only inside the finetune step, so
    even the victim's train split is its clean version here.
    """

    names = split.split("+")

    def pick(d: DatasetSplits) -> list[str]:
        pool = [e for name in names for e in d.split(name)]
        return [e.text for e in fixed_subset(pool, size, seed)]

    texts = pick(splits) if include_victim else []
    for ref in datasets:
        texts += pick(TextKind().load({"uri": ref} if isinstance(ref, str) else ref))
    return texts


@torch.no_grad()
def score_examples(
    model: SequenceClassifier,
    tokenizer,
    blocks: Sequence[nn.Module],
    directions: Directions,
    examples: Sequence[Example],
    *,
    batch_size: int,
    max_length: int,
    device: str,
    steering: SteeringHooks | None = None,
) -> ScoredPass:
    """Direction scores (read after steering, if any) and predictions of ``model`` on ``examples``.

    ``steering`` must be entered (``with hooks:``); it is reset per batch, and an input counts as
    steered when it removed any direction from it.
    """
    parts: list[DirectionScores] = []
    steered: list[torch.Tensor] = []
    preds: list[torch.Tensor] = []
    handle = model.register_forward_hook(lambda m, a, o: preds.append(o.argmax(-1).cpu()))
    try:
        for b in tokenized_batches(tokenizer, examples, batch_size, max_length):
            b = to_device(b, device)
            batch = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
            if steering is not None:
                steering.reset()
                steering.set_token_mask(batch["attention_mask"])
            parts.append(score_inputs(model, batch, directions, blocks=blocks))
            hit = torch.zeros(b["input_ids"].shape[0], dtype=torch.bool)
            if steering is not None:
                for rows in steering.triggered().values():
                    hit |= rows.any(dim=1)
            steered.append(hit)
    finally:
        handle.remove()
    if not parts:
        empty = direction_cosines(
            [torch.zeros(0, 0, directions.hidden_size)] * (directions.num_layers + 1), directions
        )
        return ScoredPass(empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool))
    return ScoredPass(DirectionScores.cat(parts), torch.cat(preds), torch.cat(steered))


def _rate(mask: torch.Tensor) -> float:
    return float(mask.float().mean()) if mask.numel() else float("nan")


def steering_hooks(
    mode: str,
    blocks: Sequence[nn.Module],
    directions: Directions,
    cal: Calibration,
    quarantined: Sequence[str] = (),
) -> SteeringHooks | None:
    """``gated``: per input, the out-of-range directions; ``quarantine``: the ``quarantined``
    directions at every token of every input; ``all``: every active direction everywhere."""
    if mode == "none" or len(directions) == 0:
        return None
    if mode == "gated":
        return SteeringHooks.from_calibration(blocks, directions, cal, sticky=False)
    if mode == "quarantine":
        if not quarantined:
            return None
        return SteeringHooks(blocks, directions.select(quarantined).vectors)
    vecs = {}
    for layer in directions.layers:
        rows, _, _ = cal.layer_bounds(layer)
        if rows.numel():
            vecs[layer] = directions.vectors[layer][rows]
    return SteeringHooks(blocks, vecs)


def _audit_columns(
    flags: torch.Tensor, directions: Directions, cal: Calibration, n: int
) -> list[str]:
    """The ``n`` directions flagging the most audit inputs, then the largest-σ ones."""
    names = cal.columns.names
    counts = flags.sum(0)
    sigma = (
        torch.cat([directions.singular_values[layer] for layer in directions.layers])
        if len(directions)
        else torch.zeros(0)
    )
    order = sorted(
        (j for j in range(len(names)) if bool(cal.active[j])),
        key=lambda j: (-int(counts[j]), -float(sigma[j])),
    )
    return [names[j] for j in order[:n]]


def weightwatch(
    model: SequenceClassifier,
    tokenizer,
    blocks: Sequence[nn.Module],
    base_writers: WriterWeights,
    tuned_writers: WriterWeights,
    splits: DatasetSplits,
    poison: Mapping[str, Any] | None = None,
    device: str = "cpu",
    *,
    k: PositiveInt = 20,
    method: Literal["exact", "randomized"] = "exact",
    calibration_split: Literal["train", "validation", "train+validation"] = "train+validation",
    calibration_size: PositiveInt | None = 5000,
    calibration_datasets: list[str | dict[str, Any]] | None = None,
    calibration_include_victim: bool = True,
    eval_size: PositiveInt | None = None,
    control_trigger: str | None = None,
    trim_percentile: TrimPercentile = 0.0,
    epsilon: NonNegativeFloat = 0.01,
    target_fpr: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] | None = None,
    selection_fraction: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] = 0.1,
    drop_last_layers: NonNegativeInt | None = None,
    steering: Literal["gated", "quarantine", "all", "none"] = "gated",
    steer_scope: Literal["sequence", "from_trigger"] = "sequence",
    max_new_tokens: PositiveInt | None = None,
    calibration_reply_tokens: NonNegativeInt | None = None,
    audit_directions: NonNegativeInt = 8,
    audit_n: PositiveInt = 5,
    batch_size: PositiveInt = 64,
    max_length: TokenLength | None = None,
    seed: Seed = 0,
) -> WatchResult:
    """WeightWatch on a classifier: directions from ΔW, calibrate on benign texts, detect, steer.

    ``k`` directions per residual writer (``method``: exact or randomized SVD). The benign range
    comes from the victim dataset's ``calibration_split`` and the same split of every dataset in
    ``calibration_datasets`` (URIs or ``{uri, columns}``), each capped at ``calibration_size``
    (``calibration_include_victim: false`` leaves the victim's own texts out, as the released
    code calibrates on generic corpora only; an unlearned model's own requests hold its declined
    topic, which would calibrate that topic as benign),
    texts, with ``trim_percentile``, ``epsilon`` and ``drop_last_layers`` as in ``Calibration``
    (defaults: the released code's k = 20, ε = 0.01, no trimming; no layer is dropped, since an
    encoder's last block output is not followed by a final norm). Evaluation
    uses the clean test split (a seeded sample of ``eval_size`` when given) and, with ``poison``
    (``{trigger, target, position}``), its non-target examples with the trigger inserted; with
    ``control_trigger`` also the same examples with that text inserted instead, whose flag rate
    (``monitor/control_flag_rate``) tells trigger-specific flags from flags on any odd insertion.
    ``steering`` is ``gated`` (per input, remove the directions out of range in that input),
    ``quarantine`` (remove, from every input, each direction that left its range on any evaluated
    input), ``all`` (every active direction) or ``none``. The audit lists, for the ``audit_directions`` directions that flag the most of the
    clean and triggered test inputs, the ``audit_n`` most extreme of those inputs at each end.

    ``target_fpr``: instead of the fixed ``epsilon``, hold out a seeded ``selection_fraction`` of
    the calibration texts, fit the ranges on the rest, and choose the smallest ε at which at
    most ``target_fpr`` of the held-out texts flag (``monitor/epsilon``); ``monitor/fpr`` is
    still measured on the test split, which chooses nothing. ``drop_last_layers`` None means 0
    here (an encoder's last block output is not followed by a final norm) and 3 on chat models
    (the released code); ``max_length`` None means 64 tokens here and 512 on chat models. Chat
    models (datasets ``chat:…``) are watched by
    ``tasks.monitor_chat``, which also reads ``steer_scope``, ``max_new_tokens`` and
    ``calibration_reply_tokens``; see that module for the chat defaults and where they differ
    from the released code.
    """
    max_length = max_length or 64
    if k < 1 or batch_size < 1 or max_length < 2 or audit_n < 1 or audit_directions < 0:
        raise ValueError("k, batch_size and audit_n must be ≥ 1, max_length ≥ 2")
    for name, value in (("calibration_size", calibration_size), ("eval_size", eval_size)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be ≥ 1 (or null for the whole split)")
    model = model.to(device).eval()
    timings: dict[str, float] = {}
    run = dict(batch_size=batch_size, max_length=max_length, device=device)

    def forward(examples: Sequence[Example], steer: SteeringHooks | None = None) -> ScoredPass:
        if steer is None:
            return score_examples(model, tokenizer, blocks, directions, examples, **run)
        with steer:
            return score_examples(
                model, tokenizer, blocks, directions, examples, steering=steer, **run
            )

    t0 = time.perf_counter()
    directions = weight_directions(
        base_writers, tuned_writers, k=k, method=method, seed=seed, num_layers=len(blocks)
    )
    timings["directions"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    texts = calibration_texts(
        splits,
        split=calibration_split,
        size=calibration_size,
        datasets=calibration_datasets or (),
        seed=seed,
        include_victim=calibration_include_victim,
    )
    held: list[str] = []
    if target_fpr is not None:
        texts, held = split_pool(texts, selection_fraction, seed)
    cal = Calibration.fit(
        forward([Example(t, 0) for t in texts]).scores,
        trim_percentile=trim_percentile,
        epsilon=epsilon,
        drop_last_layers=drop_last_layers or 0,
    )
    selection: dict[str, float] = {"monitor/n_selection": float(len(held))}
    if held:
        margins = cal.margins(forward([Example(t, 0) for t in held]).scores)
        cal = cal.with_options(epsilon=epsilon_for_fpr(margins, target_fpr or 0.0))
        selection["monitor/selection_fpr"] = float((margins > cal.epsilon).float().mean())
    timings["calibrate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    clean = fixed_subset(splits.test, eval_size, seed)
    labels = torch.tensor([e.label for e in clean], dtype=torch.long)
    plain = forward(clean)
    flag_clean = cal.flags(plain.scores)
    metrics: dict[str, float] = {
        "monitor/n_directions": float(len(directions)),
        "monitor/n_active_directions": float(int(cal.active.sum())),
        "monitor/n_calibration": float(len(texts)),
        "monitor/epsilon": float(cal.epsilon),
        **selection,
        "monitor/n_clean": float(len(clean)),
        "monitor/fpr": _rate(flag_clean.any(dim=1)),
        "monitor/clean_accuracy_before": _rate(plain.predictions == labels),
        "monitor/clean_accuracy_after": _rate(plain.predictions == labels),
        "monitor/steered_clean": 0.0,
    }
    if len(directions):
        metrics["monitor/top_singular_value"] = max(
            float(s.max()) for s in directions.singular_values.values()
        )

    audit_scores, audit_texts = [plain.scores], [e.text for e in clean]
    flag_trig = torch.zeros(0, len(cal.columns), dtype=torch.bool)
    triggered: list[Example] = []
    target = int(poison["target"]) if poison else -1

    def insert(text: str) -> list[Example]:

        position = poison.get("position", "random") if poison else "random"
        return list(
            triggered_copy(clean, trigger=text, target_label=target, position=position, seed=seed)
        )

    if poison:
        triggered = insert(poison["trigger"])
        metrics["monitor/target_rate_clean"] = _rate(plain.predictions[labels != target] == target)
        trig = forward(triggered)
        flag_trig = cal.flags(trig.scores)
        detected = flag_trig.any(dim=1)
        success = trig.predictions == target
        metrics |= {
            "monitor/n_triggered": float(len(triggered)),
            "monitor/tpr": _rate(detected),
            "monitor/tpr_successful": _rate(detected[success]),
            "monitor/asr_before": _rate(success),
            "monitor/asr_after": _rate(success),
            "monitor/steered_triggered": 0.0,
            "monitor/flagged_directions": float(int(flag_trig.any(dim=0).sum())),
        }
        if control_trigger:
            control = forward(insert(control_trigger))
            metrics["monitor/control_flag_rate"] = _rate(cal.detect(control.scores))
            metrics["monitor/control_target_rate"] = _rate(control.predictions == target)
        audit_scores.append(trig.scores)
        audit_texts += [e.text for e in triggered]

    # Quarantine: every direction that left its range on any evaluated input (the clean test
    # inputs and the triggered ones, as a running monitor would have seen them).
    ever = torch.cat([flag_clean, flag_trig]).any(dim=0)
    quarantined = [n for n, x in zip(cal.columns.names, ever.tolist(), strict=True) if x]
    metrics["monitor/quarantined_directions"] = float(len(quarantined))
    hooks = steering_hooks(steering, blocks, directions, cal, quarantined)
    if hooks is not None:
        steered = forward(clean, hooks)
        metrics["monitor/clean_accuracy_after"] = _rate(steered.predictions == labels)
        metrics["monitor/steered_clean"] = _rate(steered.steered)
        if poison:
            steered = forward(triggered, hooks)
            metrics["monitor/asr_after"] = _rate(steered.predictions == target)
            metrics["monitor/steered_triggered"] = _rate(steered.steered)
    timings["evaluate"] = time.perf_counter() - t0

    names = _audit_columns(torch.cat([flag_clean, flag_trig]), directions, cal, audit_directions)
    scores_all = DirectionScores.cat(audit_scores)
    audit = top_activating(scores_all, audit_texts, n=audit_n, names=names) if names else {}
    is_trig = [False] * len(clean) + [True] * len(triggered)
    listed = []
    for ends in audit.values():
        for side in ends.values():
            for e in side:
                e["triggered"] = is_trig[e["index"]]
                listed.append(e["triggered"])
    if poison and listed:
        metrics["monitor/audit_triggered_share"] = sum(listed) / len(listed)
        metrics["monitor/audit_triggered_base_rate"] = len(triggered) / len(is_trig)
    for name, secs in timings.items():
        metrics[f"monitor/time_{name}_s"] = secs

    per_direction = {
        name: {
            "flagged_clean": int(flag_clean[:, j].sum()),
            "flagged_triggered": int(flag_trig[:, j].sum()) if poison else None,
            # A column never seen on benign inputs has the empty range (+inf, -inf): null here.
            "lower": float(cal.lower[j]) if cal.lower[j].isfinite() else None,
            "upper": float(cal.upper[j]) if cal.upper[j].isfinite() else None,
            "active": bool(cal.active[j]),
        }
        for j, name in enumerate(cal.columns.names)
    }
    details = {"per_direction": per_direction, "audited": names, "n_triggered": len(triggered)}
    # Rates over no inputs (e.g. no attack succeeded) are undefined and left out.
    metrics = {k_: v for k_, v in metrics.items() if v == v}
    return WatchResult(metrics, directions, cal, audit, details)


register_op("monitor", "weightwatch", fn=weightwatch)


def _audit_summary(result: WatchResult, poison: Mapping[str, Any] | None) -> str:
    lines = ["", "## Flags per audited direction", ""]
    if poison:
        lines.append(
            f"Trigger {poison.get('trigger', poison.get('topic'))!r} → {poison['target']!r}. "
            "`triggered listed` counts triggered test copies among the inputs listed above."
        )
        lines.append("")
    lines += [
        "| direction | flagged clean | flagged triggered | triggered listed |",
        "|---|---|---|---|",
    ]
    for name in result.details["audited"]:
        d = result.details["per_direction"][name]
        ends = result.audit.get(name, {})
        listed = [e for side in ends.values() for e in side]
        trig = sum(bool(e.get("triggered")) for e in listed)
        ft = "-" if d["flagged_triggered"] is None else str(d["flagged_triggered"])
        lines.append(f"| `{name}` | {d['flagged_clean']} | {ft} | {trig}/{len(listed)} |")
    return "\n".join(lines) + "\n"


def write_outputs(
    ctx_dir, result: WatchResult, poison: Mapping[str, Any] | None, title: str
) -> None:
    """Directions, calibration, audit (Markdown and JSON) and per-direction facts into ``ctx_dir``."""
    result.directions.save(ctx_dir / "directions.safetensors")
    result.calibration.save(ctx_dir / "calibration.safetensors")
    path = write_audit_markdown(result.audit, ctx_dir / "audit.md", title=title)
    with path.open("a", encoding="utf-8") as f:
        f.write(_audit_summary(result, poison))
    (ctx_dir / "audit.json").write_text(json.dumps(result.audit, indent=1))
    (ctx_dir / "monitor.json").write_text(json.dumps(result.details, indent=1, sort_keys=True))


def execute(ctx: NodeContext) -> dict[str, float]:
    op = get_op("monitor", ctx.op)
    art = ModelArtifact.open(ctx.inputs["model"])
    if node_kind(ctx).name == "chat":
        return execute_chat(ctx, art)
    ds = ctx.params["dataset"]
    slug = dataset_slug(ds["uri"])
    if slug not in art.heads:
        raise ValueError(
            f"the watched model has no head for {ds['uri']} (heads: {sorted(art.heads)})"
        )
    task = TextKind().from_artifact(art, device=ctx.device, allow_remote_code=ctx.allow_remote_code)
    task.use(None, art.all_heads(), slug)
    model, tokenizer = task.model, task.tokenizer
    # The watched weights are the loaded backbone's own (the artifact's keys), not a second read.
    tuned = model.backbone.state_dict()
    base = LazyStateDict(base_weights_file(ctx.base, ctx.allow_remote_code))
    layout = detect_layout(load_config(ctx.base, ctx.allow_remote_code), list(tuned.keys()))
    blocks = layout.block_modules(model.backbone)
    splits = TextKind().load(ds)
    poison = ctx.params.get("poison")
    result = op.fn(
        model,
        tokenizer,
        blocks,
        layout.residual_writer_weights(base, ctx.device),
        layout.residual_writer_weights(tuned, ctx.device),
        splits,
        poison,
        ctx.device,
        **ctx.params["op"],
    )
    kind = art.meta.get("attack") or art.meta.get("protect") or art.meta.get("release", "model")
    title = f"Weight-direction audit: {slug} ({kind})"
    write_outputs(ctx.out_dir, result, poison, title)
    return result.metrics


def execute_chat(ctx: NodeContext, art: ModelArtifact) -> dict[str, float]:
    """The monitor node on a chat model (``tasks.monitor_chat``)."""
    kind = ChatKind()
    ds = ctx.params["dataset"]
    data = kind.load(ds)
    task = kind.from_artifact(art, device=ctx.device, allow_remote_code=ctx.allow_remote_code)
    task.use(data)
    tuned = task.backbone().state_dict()
    base = LazyStateDict(base_weights_file(ctx.base, ctx.allow_remote_code))
    layout = detect_layout(load_config(ctx.base, ctx.allow_remote_code), list(tuned.keys()))
    poison = ctx.params.get("poison")
    metrics, directions, cal, audit, details = watch_chat(
        task,
        layout.residual_writer_weights(base, ctx.device),
        layout.residual_writer_weights(tuned, ctx.device),
        data,
        poison,
        ctx.device,
        **ctx.params["op"],
    )
    result = WatchResult(metrics, directions, cal, audit, details)
    what = art.meta.get("attack") or art.meta.get("protect") or art.meta.get("release", "model")
    write_outputs(
        ctx.out_dir, result, poison, f"Weight-direction audit: {dataset_slug(ds['uri'])} ({what})"
    )
    return metrics
