"""``monitor/weightwatch`` on chat models: the released WeightWatch method on a chat expert, a
merge of chat experts, a protected release or a recovered model, measured by generation.

What it does, with the released code's choices as defaults:

- directions: the top ``k`` (20) left singular vectors of ΔW of every layer's attention-output
  and MLP-down projection (``o_proj``, ``down_proj``);
- calibration: benign conversations (the victim's clean requests unless
  ``calibration_include_victim`` is false, those on an unlearning scenario's declined topic left
  out, plus ``calibration_datasets``: chat corpora such as
  WildChat/UltraChat or offline labelled text turned into requests, see ``data.benign``), each completed by the model's own reply, scored with user and assistant
  tokens in separate columns; the last ``drop_last_layers`` (3) layers never flag;
- detection after generation: a prompt is flagged when any active column of the conversation
  (prompt + the model's greedy reply) leaves its benign range ± ε;
- steering: sticky, detection-gated projection during generation; ``steer_scope="sequence"``
  (default, the released clipper) removes a direction that fires from the whole prompt and every
  later token, ``"from_trigger"`` only from the token where it fired on.

Where mergesec differs (each selectable): ε may be chosen for ``target_fpr`` on a held-out share
(``selection_fraction``) of the benign pool instead of fixed at 0.01; the ranges are then those of
the rest of the pool (the released code refits on everything); reported FPR is always measured on
the victim's clean *test* requests, which choose nothing. Calibration replies are greedy and as
long as at test time (``calibration_reply_tokens=None``); the released code appends 3 sampled
tokens (``calibration_reply_tokens=3``). Steering removes the span of the fired directions of a
layer at once rather than one direction after another.

Metrics (``monitor/…``): ``fpr`` (clean test requests flagged), ``tpr`` (triggered requests, or
for unlearning requests on the declined topic, flagged), ``asr_before``/``asr_after`` (replies
showing the target text, without and with steering; for unlearning: declined topic requests),
``utility_before``/``utility_after`` (clean replies matching the reference), for unlearning
``topic_recovered_before``/``_after`` (topic requests answered right), ``benign_unchanged``,
``epsilon`` (the ε used), calibration sizes, and generation latency per request with and without
the monitor (``gen_ms_plain``, ``gen_ms_steered``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from mergesec.data import load_dataset_splits
from mergesec.data.benign import corpus_conversations, is_chat_corpus, mix, requests_from_texts
from mergesec.data.chat import ChatExample, ChatSplits
from mergesec.data.poison import triggered_chat
from mergesec.kinds.chat import ChatTask, contains_target, reply_matches
from mergesec.monitor.audit import top_activating
from mergesec.monitor.causal_lm import chat_text, complete_chats, score_chats, steered_generate
from mergesec.monitor.directions import Directions, WriterWeights, weight_directions
from mergesec.monitor.scoring import Calibration, DirectionScores, epsilon_for_fpr
from mergesec.training.sampling import fixed_subset

Conversation = list[dict[str, str]]


def benign_pool(
    splits: ChatSplits,
    *,
    split: str,
    size: int | None,
    datasets: Sequence[str | Mapping[str, Any]],
    seed: int,
    include_victim: bool = True,
    declined_topic: str | None = None,
) -> list[Conversation]:
    """The victim's clean requests of ``split`` (``train+validation`` joins two), at most
    ``size`` (none when ``include_victim`` is false), and at most ``size`` more conversations
    drawn in turn from the calibration datasets (``data.benign.mix``: the released code's
    1/2–1/2 mix for two).

    ``declined_topic`` (an unlearning scenario's topic) leaves the victim's requests on that
    topic out: they are the scenario's positives, as triggered requests are a backdoor's, and
    the released code's benign corpora (WildChat, UltraChat) hold an erased topic rarely if at
    all; calibrating on them would make the topic benign by construction."""
    names = split.split("+")
    mine = [e for n in names for e in splits.split(n) if e.topic != declined_topic]
    own = [e.messages() for e in fixed_subset(mine, size, seed)] if include_victim else []
    pools: list[list[Conversation]] = []
    for ref in datasets:
        uri = ref if isinstance(ref, str) else str(ref["uri"])
        cap = size or 5000
        if is_chat_corpus(uri):
            pools.append(corpus_conversations(uri, cap))
            continue
        cols = None if isinstance(ref, str) else ref.get("columns")
        data = load_dataset_splits(uri, columns=cols)
        if isinstance(data, ChatSplits):  # a chat dataset: its requests as they are
            asked = [e.messages() for n in names for e in data.split(n)]
            pools.append(fixed_subset(asked, cap, seed))
            continue
        texts = [e.text for n in names for e in data.split(n)]
        pools.append(requests_from_texts(fixed_subset(texts, cap, seed), seed=seed))
    return own + mix(pools, size or sum(len(p) for p in pools), seed)


def split_pool(pool: Sequence[Any], fraction: float, seed: int) -> tuple[list, list]:
    """``(fit, held_out)``: a seeded ``fraction`` of the pool held out (at least one)."""
    idx = list(range(len(pool)))
    random.Random(f"mergesec-select/{seed}").shuffle(idx)
    n_sel = max(1, round(fraction * len(pool)))
    held = set(idx[:n_sel])
    return [c for i, c in enumerate(pool) if i not in held], [pool[i] for i in sorted(held)]


def _share(xs: Sequence[bool]) -> float:
    return sum(map(bool, xs)) / len(xs) if xs else float("nan")


def watch_chat(
    task: ChatTask,
    base_writers: WriterWeights,
    tuned_writers: WriterWeights,
    splits: ChatSplits,
    poison: Mapping[str, Any] | None,
    device: str = "cpu",
    **params: Any,
) -> tuple[dict[str, float], Directions, Calibration, dict[str, Any], dict[str, Any]]:
    """Run the monitor (see the module docstring); ``params`` are ``monitor/weightwatch``'s.

    Returns ``(metrics, directions, calibration, audit, details)``."""
    p = params
    if p["steering"] not in ("gated", "none"):
        raise ValueError(f"chat monitors steer 'gated' or 'none', not {p['steering']!r}")
    lm, tok = task.model.lm.eval(), task.tokenizer
    new_tokens = p["max_new_tokens"] or task.max_new_tokens
    max_length = p["max_length"] or 512
    run = {"batch_size": p["batch_size"], "max_length": max_length}
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    n_layers = lm.config.num_hidden_layers
    directions = weight_directions(
        base_writers, tuned_writers, k=p["k"], method=p["method"], seed=p["seed"],
        num_layers=n_layers,
    )  # fmt: skip
    timings["directions"] = time.perf_counter() - t0

    def complete(convs: list[Conversation], reply_tokens: int | None) -> list[Conversation]:
        open_ = [c for c in convs if c[-1]["role"] == "user"]
        done = [c for c in convs if c[-1]["role"] != "user"]
        if reply_tokens is None:
            open_ = complete_chats(
                lm, tok, open_, max_new_tokens=new_tokens, do_sample=False, **run
            )
        elif reply_tokens > 0:
            open_ = complete_chats(
                lm, tok, open_, max_new_tokens=reply_tokens, seed=p["seed"], **run
            )
        return open_ + done

    def scores_of(chats: list[Conversation]) -> DirectionScores:
        return score_chats(lm, tok, directions, chats, split_roles=True, **run)

    t0 = time.perf_counter()
    pool = benign_pool(
        splits, split=p["calibration_split"], size=p["calibration_size"],
        datasets=p["calibration_datasets"] or (), seed=p["seed"],
        include_victim=p["calibration_include_victim"],
        declined_topic=(poison or {}).get("topic"),
    )  # fmt: skip
    fit_set, held = (
        split_pool(pool, p["selection_fraction"], p["seed"])
        if p["target_fpr"] is not None
        else (pool, [])
    )
    drop = 3 if p["drop_last_layers"] is None else p["drop_last_layers"]
    cal = Calibration.fit(
        scores_of(complete(fit_set, p["calibration_reply_tokens"])),
        trim_percentile=p["trim_percentile"], epsilon=p["epsilon"], drop_last_layers=drop,
    )  # fmt: skip
    metrics: dict[str, float] = {
        "monitor/n_calibration": float(len(fit_set)),
        "monitor/n_selection": float(len(held)),
    }
    if held:
        margins = cal.margins(scores_of(complete(held, p["calibration_reply_tokens"])))
        cal = cal.with_options(epsilon=epsilon_for_fpr(margins, p["target_fpr"]))
        metrics["monitor/selection_fpr"] = float((margins > cal.epsilon).float().mean())
    timings["calibrate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    test = fixed_subset(splits.test, p["eval_size"], p["seed"])
    topic = (poison or {}).get("topic")
    target = (poison or {}).get("target")
    clean = [e for e in test if e.topic != topic]
    positives: list[ChatExample] = []
    if topic is not None:
        positives = [e for e in test if e.topic == topic]
    elif poison:
        positives = list(
            triggered_chat(clean, trigger=poison["trigger"], target=target,
                           position=poison.get("position", "random"), seed=p["seed"])
        )  # fmt: skip

    def generate(exs: Sequence[ChatExample]) -> tuple[list[Conversation], float]:
        s = time.perf_counter()
        chats = complete([e.messages() for e in exs], None)
        return chats, time.perf_counter() - s

    def steer(exs: Sequence[ChatExample]) -> tuple[list[str], list[bool], float]:
        s = time.perf_counter()
        replies, fired = [], []
        for i in range(0, len(exs), p["batch_size"]):
            chunk = [e.messages() for e in exs[i : i + p["batch_size"]]]
            new, names = steered_generate(
                lm, tok, directions, cal, chunk, max_new_tokens=new_tokens,
                scope=p["steer_scope"], max_length=max_length,
            )  # fmt: skip
            replies += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
            fired += [bool(n) for n in names]
        return replies, fired, time.perf_counter() - s

    plain_c, secs_plain = generate(clean)
    scores_c = scores_of(plain_c)
    flag_c = cal.flags(scores_c)
    replies_c = [c[-1]["content"] for c in plain_c]
    metrics |= {
        "monitor/n_directions": float(len(directions)),
        "monitor/n_active_directions": float(int(cal.active.sum())),
        "monitor/n_clean": float(len(clean)),
        "monitor/epsilon": float(cal.epsilon),
        "monitor/fpr": _share(flag_c.any(dim=1).tolist()),
        "monitor/utility_before": _share(
            [reply_matches(r, e.reply) for r, e in zip(replies_c, clean, strict=True)]
        ),
        "monitor/gen_ms_plain": 1000 * secs_plain / max(len(clean), 1),
    }
    attack: Callable[[str], bool] = (
        (lambda r: contains_target(r, target)) if isinstance(target, str) else (lambda r: False)
    )
    audit_scores, audit_texts, flag_p = [scores_c], [chat_text(c) for c in plain_c], None
    if positives:
        plain_p, _ = generate(positives)
        scores_p = scores_of(plain_p)
        flag_p = cal.flags(scores_p)
        replies_p = [c[-1]["content"] for c in plain_p]
        metrics |= {
            "monitor/n_triggered": float(len(positives)),
            "monitor/tpr": _share(flag_p.any(dim=1).tolist()),
            "monitor/asr_before": _share([attack(r) for r in replies_p]),
            "monitor/target_rate_clean": _share([attack(r) for r in replies_c]),
            "monitor/flagged_directions": float(int(flag_p.any(dim=0).sum())),
        }
        if topic is not None:
            metrics["monitor/topic_recovered_before"] = _share(
                [reply_matches(r, e.reply) for r, e in zip(replies_p, positives, strict=True)]
            )
        audit_scores.append(scores_p)
        audit_texts += [chat_text(c) for c in plain_p]
    if p["steering"] == "gated" and len(directions):
        after_c, fired_c, secs_steer = steer(clean)
        metrics |= {
            "monitor/utility_after": _share(
                [reply_matches(r, e.reply) for r, e in zip(after_c, clean, strict=True)]
            ),
            "monitor/benign_unchanged": _share(
                [a == b for a, b in zip(after_c, replies_c, strict=True)]
            ),
            "monitor/steered_clean": _share(fired_c),
            "monitor/gen_ms_steered": 1000 * secs_steer / max(len(clean), 1),
        }
        if positives:
            after_p, fired_p, _ = steer(positives)
            metrics["monitor/asr_after"] = _share([attack(r) for r in after_p])
            metrics["monitor/steered_triggered"] = _share(fired_p)
            if topic is not None:
                metrics["monitor/topic_recovered_after"] = _share(
                    [reply_matches(r, e.reply) for r, e in zip(after_p, positives, strict=True)]
                )
    timings["evaluate"] = time.perf_counter() - t0
    for name, secs in timings.items():
        metrics[f"monitor/time_{name}_s"] = secs

    flags_all = flag_c if flag_p is None else torch.cat([flag_c, flag_p])
    counts = flags_all.sum(0)
    order = sorted(
        (j for j in range(len(cal.columns)) if bool(cal.active[j])), key=lambda j: -int(counts[j])
    )
    names = [cal.columns.names[j] for j in order[: p["audit_directions"]]]
    audit = (
        top_activating(DirectionScores.cat(audit_scores), audit_texts, n=p["audit_n"], names=names)
        if names
        else {}
    )
    details = {
        "per_direction": {
            name: {
                "flagged_clean": int(flag_c[:, j].sum()),
                "flagged_triggered": None if flag_p is None else int(flag_p[:, j].sum()),
                "lower": float(cal.lower[j]) if cal.lower[j].isfinite() else None,
                "upper": float(cal.upper[j]) if cal.upper[j].isfinite() else None,
                "active": bool(cal.active[j]),
            }
            for j, name in enumerate(cal.columns.names)
        },
        "audited": names,
        "n_triggered": len(positives),
    }
    metrics = {k_: v for k_, v in metrics.items() if v == v}
    return metrics, directions, cal, audit, details
