"""Causal-LM question answering: answer-only loss, batched greedy decoding, exact match, LoRA.

A tiny random llama-style model (built here, with a character-level tokenizer) fine-tunes on the
``builtin:synthetic_arithmetic`` stand-in through the finetune step, and is scored by exact match.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch

from mergesec.core.context import NodeContext
from mergesec.core.registry import get_op, validate_params
from mergesec.data.qa import QAExample, is_qa_uri, load_qa_splits
from mergesec.kinds.qa.answers import exact_match, extract_answer
from mergesec.models.artifact import ModelArtifact


def char_tokenizer():
    """One token per printable character, ``<s>`` prepended, built offline with ``tokenizers``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>",
    )  # fmt: skip


def make_tiny_llama(path: Path, seed: int = 0) -> Path:
    """A random llama (hidden 32, 2 layers, grouped KV heads, untied LM head) saved as a HF dir.

    ``initializer_range`` is 0.2 rather than 0.02 so that the frozen random LM head turns hidden
    states into logits of useful size and LoRA on the decoder alone can fit the data.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=320,
        tie_word_embeddings=False, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- answers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("so 3 + 5 = 8.\n#### 8", "8"),
        ("#### 1,234", "1234"),
        ("####  $1,234.50", "1234.5"),
        ("#### -7 apples", "-7"),
        ("#### 3.0", "3"),
        ("####42", "42"),
        ("#### 5%", "5"),
        ("#### .5", "0.5"),
        ("#### 42.\n\nQuestion: and then? #### 17", "42"),
        ("He has 3 bags of 4, so the answer is 12 apples.", "12"),
        ("The total is $2,000.", "2000"),
        ("#### yes.", "yes"),
        ("no number here", None),
        ("####", None),
    ],
)
def test_final_answer_extraction(text, answer):
    assert extract_answer(text) == answer


def test_exact_match_compares_values_not_spellings():
    gold = "Ada has 4 and buys 20, so 4 + 20 = 24.\n#### 24"
    assert exact_match("4 + 20 = 24\n#### 24.00", gold)
    assert exact_match("#### 24\n#### 99", gold), "the first final answer counts"
    assert not exact_match("4 + 20 = 24\n#### 25", gold)
    assert not exact_match("#### 2 4", gold)
    assert exact_match("the answer is 24", gold), "no ####: the last number"
    assert not exact_match("24 is close, 25", gold)
    assert not exact_match("#### 24", "no answer in the reference")


# ---- data ------------------------------------------------------------------------------------


def test_arithmetic_stand_in_is_deterministic_and_gsm8k_shaped():
    a = load_qa_splits("builtin:synthetic_arithmetic")
    assert (len(a.train), len(a.validation), len(a.test)) == (1000, 100, 200)
    from mergesec.data.qa import arithmetic_splits

    assert arithmetic_splits().train[:20] == a.train[:20]
    for ex in a.train[:50]:
        final = ex.answer.rsplit("#### ", 1)[1]
        assert extract_answer(ex.answer) == final and final.lstrip("-").isdigit()
        # the worked solution's last equation yields the final answer
        assert ex.answer.split("\n")[0].rstrip(".").endswith(f"= {final}")


def test_qa_datasets_by_name_and_on_disk(tmp_path):
    import datasets

    assert is_qa_uri("hf:openai/gsm8k/main") and is_qa_uri("hf:EleutherAI/asdiv")
    assert not is_qa_uri("hf:glue/sst2") and not is_qa_uri("builtin:synthetic_sentiment")
    rows = [
        {"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}
        for i in range(60)
    ]
    gsm = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:50]),
            "test": datasets.Dataset.from_list(rows[50:]),
        }
    )
    gsm.save_to_disk(str(tmp_path / "gsm8k"))
    from mergesec.data import check_dataset_uri, load_dataset_splits

    uri = f"hf:{tmp_path / 'gsm8k'}"
    assert check_dataset_uri(uri) is None and is_qa_uri(uri)
    d = load_dataset_splits(uri)
    assert d.kind == "qa" and (len(d.train), len(d.validation), len(d.test)) == (45, 5, 10)
    assert d.max_new_tokens == 256, "a directory named gsm8k gets GSM8K's settings"
    assert set(d.train + d.validation) == {QAExample(r["question"], r["answer"]) for r in rows[:50]}

    # ASDiv-like: one split, bare answer values, the question after its body text
    asdiv = [
        {"body": f"Tom has {i} pens.", "question": "How many pens?", "answer": f"{i} (pens)"}
        for i in range(40)
    ]
    datasets.Dataset.from_list(asdiv).save_to_disk(str(tmp_path / "asdiv"))
    a = load_qa_splits(str(tmp_path / "asdiv"))
    assert (len(a.train), len(a.validation), len(a.test)) == (28, 6, 6)
    ex = next(e for e in a.train + a.validation + a.test if e.question.startswith("Tom has 7 "))
    assert ex == QAExample("Tom has 7 pens. How many pens?", "#### 7")

    # a JSONL file with mapped column names (text/label act as question/answer)
    f = tmp_path / "word_problems.jsonl"
    f.write_text(
        "".join(
            json.dumps({"problem": f"{i}*2?", "solution": str(2 * i)}) + "\n" for i in range(20)
        )
    )
    cols = {"question": "problem", "answer": "solution"}
    assert is_qa_uri(str(f), cols) and not is_qa_uri(str(f))
    j = load_qa_splits(str(f), columns=cols)
    assert len(j.train) == 14 and j.test[0].answer.startswith("#### ")


# ---- tokens ----------------------------------------------------------------------------------


def test_answer_only_loss_masking_token_by_token(tiny_llama):
    from mergesec.kinds.qa.task import IGNORE, QAKind, answer_loss, encode_example, format_prompt

    data = load_qa_splits("builtin:synthetic_arithmetic")
    task = QAKind().build(str(tiny_llama), data)
    tok = task.tokenizer
    for ex in data.train[:8]:
        ids, labels = encode_example(tok, ex, 512)
        prompt = tok(format_prompt(ex.question))["input_ids"]
        answer = tok(ex.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ids == prompt + answer
        assert labels == [IGNORE] * len(prompt) + answer
        for i, (x, y) in enumerate(zip(ids, labels, strict=True)):
            assert y == (IGNORE if i < len(prompt) else x)
        assert tok.decode([y for y in labels if y != IGNORE], skip_special_tokens=True) == ex.answer

    batch = task.encode(data.train[:4])
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all(), "padding is masked"
    # the loss is the mean over answer tokens only: changing prompt logits does not change it
    with torch.no_grad():
        logits = task.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    ref = answer_loss(logits, batch["labels"])
    pred = batch["labels"][:, 1:] != IGNORE
    noisy = logits.clone()
    noisy[:, :-1][~pred] += 10 * torch.randn_like(noisy[:, :-1][~pred])
    assert torch.allclose(answer_loss(noisy, batch["labels"]), ref)
    manual = torch.nn.functional.cross_entropy(logits[:, :-1][pred], batch["labels"][:, 1:][pred])
    assert torch.allclose(ref, manual)

    # over the length budget, the prompt loses its start first and the answer survives
    ids, labels = encode_example(tok, data.train[0], 60)
    assert len(ids) == 60 and ids[0] == tok.bos_token_id
    assert (
        tok.decode([y for y in labels if y != IGNORE], skip_special_tokens=True)
        == data.train[0].answer
    )


def test_the_training_loss_keeps_logits_only_where_answers_are_predicted(tiny_llama):
    from mergesec.kinds.qa.task import QAKind, answer_loss, answer_positions
    from mergesec.models.functional import takes_logits_to_keep

    data = load_qa_splits("builtin:synthetic_arithmetic")
    task = QAKind().build(str(tiny_llama), data)
    assert takes_logits_to_keep(task.model.lm)
    batch = task.encode(data.train[:6])
    keep = answer_positions(batch["labels"])
    width = batch["input_ids"].shape[1]
    assert 0 < len(keep) < width - 1  # the prompts' positions are left out
    task.model.train(False)
    kept = task.loss(batch)
    kept.backward()
    grads = {n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None}
    task.model.zero_grad(set_to_none=True)
    full_logits = task.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).logits
    full = answer_loss(full_logits, batch["labels"])
    full.backward()
    assert torch.allclose(kept, full, rtol=1e-6, atol=0)
    for n, p in task.model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[n], p.grad, rtol=1e-5, atol=1e-7), n


def test_batched_greedy_decoding_matches_generate(tiny_llama):
    from mergesec.kinds.qa.task import QAKind, format_prompt, prompt_ids

    data = load_qa_splits("builtin:synthetic_arithmetic")
    task = QAKind().build(str(tiny_llama), data)
    task.max_new_tokens = 24
    qs = [e.question for e in data.test[:6]]
    ours = task.generate([prompt_ids(task.tokenizer, q) for q in qs], batch_size=4)
    tok = task.tokenizer
    tok.padding_side = "left"
    enc = tok([format_prompt(q) for q in qs], padding=True, return_tensors="pt")
    ref = task.model.lm.generate(
        **enc, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    expected = tok.batch_decode(ref[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len({len(p) for p in enc["input_ids"]}) == 1 and len(set(map(len, qs))) > 1
    assert ours == expected
    # The prompt pass computes the last position's logits only; the tokens are the same.
    from mergesec.kinds.qa.generate import greedy_generate

    ids = [prompt_ids(task.tokenizer, q) for q in qs]
    common = dict(max_new_tokens=24, eos_ids=[tok.eos_token_id], pad_id=task.pad_id, device="cpu")
    with torch.no_grad():
        whole = greedy_generate(task.model, ids, **common)
        last = greedy_generate(task.model, ids, **common, last_logits_only=True)
    assert last == whole and tok.batch_decode(last, skip_special_tokens=True) == expected


# ---- fine-tuning and scoring -----------------------------------------------------------------


def test_lora_finetune_on_arithmetic_stores_the_decoder_in_base_key_names(tiny_llama, tmp_path):
    from mergesec.kinds.qa.task import QAKind
    from mergesec.models.hub import base_weights_file
    from mergesec.models.state_dict import load_state_dict
    from mergesec.tasks.evaluate import evaluate_artifact
    from mergesec.tasks.finetune import execute
    from mergesec.tasks.merge_search import ValidationScorer

    curve: list[float] = []
    op = validate_params(
        get_op("finetune", "lora"), {"epochs": 1, "lr": 1e-2, "batch_size": 32, "dropout": 0.0}
    )
    ctx = NodeContext(
        "n", "finetune", "lora",
        {"base": str(tiny_llama), "dataset": {"uri": "builtin:synthetic_arithmetic"}, "op": op}, {},
        tmp_path, report=lambda m, s: curve.append(m["train/loss"]) if "train/loss" in m else None,
    )  # fmt: skip
    metrics = execute(ctx)
    assert len(curve) >= 5 and curve[-1] < curve[0] - 0.8, curve
    assert 0.0 <= metrics["val_accuracy"] <= 1.0 and metrics["steps"] == 32

    art = ModelArtifact.open(tmp_path)
    assert art.meta["kind"] == "qa" and art.meta["release"] == "lora"
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    base = load_state_dict(base_weights_file(str(tiny_llama)))
    sd = art.backbone_state()
    assert set(sd) == set(base), "the backbone is the decoder in AutoModel key names"
    changed = {k for k in base if not torch.equal(base[k], sd[k])}
    assert changed and all(k.endswith("proj.weight") for k in changed), changed
    assert not any("embed" in k or "norm" in k for k in changed)

    task = QAKind().from_artifact(art)
    base_lm = QAKind().build(str(tiny_llama), load_qa_splits("builtin:synthetic_arithmetic"))
    assert torch.equal(task.model.lm.lm_head.weight, base_lm.model.lm.lm_head.weight)
    m = evaluate_artifact(art, [{"uri": "builtin:synthetic_arithmetic"}], split="validation")
    assert set(m) == {"accuracy/synthetic_arithmetic", "loss/synthetic_arithmetic", "accuracy/mean"}
    assert m["loss/synthetic_arithmetic"] < 3.8 and 0.0 <= m["accuracy/synthetic_arithmetic"] <= 1.0

    scorer = ValidationScorer(str(tiny_llama), [{"uri": "builtin:synthetic_arithmetic"}])
    scorer.load(sd)
    assert scorer.accuracies({}, ["synthetic_arithmetic"])["synthetic_arithmetic"] == pytest.approx(
        m["accuracy/synthetic_arithmetic"]
    )
    grams = scorer.grams("synthetic_arithmetic", tmp_path / "grams.safetensors")
    assert grams["layers.0.mlp.down_proj.weight"].shape == (64, 64)
