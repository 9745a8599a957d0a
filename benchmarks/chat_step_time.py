"""Time a LoRA chat training step on SmolLM2-135M-Instruct with the LM head at every position
(the baseline) against the head only where an answer token is predicted (what
``QATask.loss`` does through ``logits_to_keep``).

The batches are the chat study's: BBC News topic questions rendered with the model's chat
template, batches of 8, LoRA r 8 on every linear layer. Both variants run in the same process on
the same batches, alternating by round; the first step of each round is a warm-up and not timed.

    python benchmarks/chat_step_time.py [--threads 1] [--steps 6] [--rounds 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

import mergesec.kinds.qa.task as qa_task
from mergesec.kinds.chat import ChatKind
from mergesec.training.lora import attach_lora

DATA = "chat:builtin:bbc_news?train=320&validation=16&test=32&words=24"


def seconds_per_step(task, batches, *, whole_head: bool) -> float:
    keeps = qa_task.takes_logits_to_keep
    if whole_head:
        qa_task.takes_logits_to_keep = lambda lm: False
    try:
        times = []
        for b in batches:
            t = time.perf_counter()
            task.loss(b).backward()
            task.model.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
    finally:
        qa_task.takes_logits_to_keep = keeps
    return sum(times[1:]) / len(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kind = ChatKind()
    data = kind.load({"uri": DATA})
    task = kind.build("builtin:smollm2-135m-instruct", data, device=args.device)
    attach_lora(task, {"mode": "lora", "r": 8, "alpha": 16, "dropout": 0.0})
    task.model.train()
    batches = [task.encode(data.train[i * 8 : (i + 1) * 8]) for i in range(args.steps)]
    print(f"SmolLM2-135M LoRA chat step, batch 8, {args.threads} thread(s), {args.device}")
    for r in range(args.rounds):
        whole = seconds_per_step(task, batches, whole_head=True)
        kept = seconds_per_step(task, batches, whole_head=False)
        print(
            f"round {r + 1}: LM head everywhere {whole:.2f} s/step, "
            f"answer positions only {kept:.2f} s/step, ratio {kept / whole:.2f}"
        )


if __name__ == "__main__":
    main()
