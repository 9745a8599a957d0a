"""The QA task kind: a causal LM fine-tuned on question/answer pairs and scored by exact match.

Each example is the prompt ``Question: …\\nAnswer: Let's think step by step.\\n`` (Trap²'s LLM
format) followed by the reference answer and EOS; the loss is the mean cross-entropy over answer
and EOS tokens only (prompt and padding positions carry label -100). Scoring decodes greedily in
batches and compares final answers (``lm.answers.exact_match``).

Key names: an LM expert's stored backbone is ``lm.base_model`` (``LlamaModel``, ``GPT2Model``, ...),
which is what ``models.hub.load_backbone`` (``AutoModel``) and ``base_weights_file`` hold for the
same base, so task vectors, merges, protections and monitors compare like with like. With tied
input/output embeddings the LM head is the embedding matrix and is trained and merged with the
backbone; an untied LM head stays frozen at the base's weights (and is read from the base when a
model is loaded), so the backbone alone describes an expert.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergesec.data.qa import QAExample, QASplits, load_qa_splits
from mergesec.data.splits import cap_splits
from mergesec.kinds.common import load_backbone_weights, state_on_cpu
from mergesec.kinds.qa.answers import exact_match
from mergesec.kinds.qa.generate import greedy_generate
from mergesec.models.artifact import HeadInfo, ModelArtifact
from mergesec.models.functional import forward_with, takes_logits_to_keep
from mergesec.models.hub import load_tokenizer, resolve_model_path
from mergesec.training.batch import Batch, chunks, length_grouped, shuffled
from mergesec.training.lora import wrap_with_lora
from mergesec.training.precision import Precision, choose_precision
from mergesec.training.sampling import fixed_subset

PROMPT = "Question: {question}\nAnswer: Let's think step by step.\n"
IGNORE = -100


def format_prompt(question: str) -> str:
    return PROMPT.format(question=question.strip())


def prompt_ids(tokenizer: Any, question: str) -> list[int]:
    """Token ids of the prompt with the tokenizer's own leading special tokens, never a trailing EOS."""
    ids = list(tokenizer(format_prompt(question))["input_ids"])
    eos = tokenizer.eos_token_id
    while ids and eos is not None and ids[-1] == eos and len(ids) > 1:
        ids.pop()
    return ids


def encode_example(tokenizer: Any, ex: QAExample, max_length: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)``: prompt then answer + EOS; labels are -100 on the prompt.

    Over ``max_length`` the prompt loses tokens from its start first (its leading special token
    kept), then the answer from its end.
    """
    p = prompt_ids(tokenizer, ex.question)
    a = list(tokenizer(ex.answer, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    if len(p) + len(a) > max_length:
        room = max(1, max_length - len(a))
        p = p[:1] + p[len(p) - room + 1 :] if room > 1 else p[:1]
        a = a[: max_length - len(p)]
    return p + a, [IGNORE] * len(p) + a


def collate(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    for i, (x, y) in enumerate(encoded):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
        labels[i, : len(y)] = torch.tensor(y)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def answer_loss(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy on positions whose label is not -100."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE,
        reduction=reduction,
    )


def answer_positions(labels: Tensor) -> Tensor:
    """Sequence positions whose next token is an answer label in any row of the batch: the only
    positions whose logits ``answer_loss`` reads."""
    return (labels[:, 1:] != IGNORE).any(0).nonzero().squeeze(1)


def kept_answer_loss(logits: Tensor, labels: Tensor, keep: Tensor) -> Tensor:
    """``answer_loss`` from logits computed at the positions ``keep`` only (``logits_to_keep``)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels[:, keep + 1].reshape(-1),
        ignore_index=IGNORE,
    )


class CausalLMModel(nn.Module):
    """A causal LM behind one attribute (``lm``) so a LoRA wrapper can replace it."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, **kwargs):
        return self.lm(**kwargs)


@dataclass
class ScoreBatch:
    """One scoring batch: teacher-forced answers (for the loss) and prompts with gold answers."""

    batch: Batch
    prompts: list[list[int]]
    answers: list[str]


def _unwrapped(lm: nn.Module) -> nn.Module:
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


class QATask:
    """A causal LM with its tokenizer, device, precision and length settings (a ``TaskModel``)."""

    eval_batch_size: int | None = None  # validation during training: the training batch size

    def __init__(
        self,
        lm: nn.Module,
        tokenizer: Any,
        *,
        device: str = "cpu",
        precision: Precision | None = None,
        max_length: int = 512,
        max_new_tokens: int = 256,
    ):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; QA fine-tuning needs one")
        self.model = CausalLMModel(lm).to(device)
        self.tokenizer = tokenizer
        self.device = device
        self.precision = precision or choose_precision(device)
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = tokenizer.eos_token_id

    @property
    def backbone_prefix(self) -> str:
        return f"lm.{_unwrapped(self.model.lm).base_model_prefix}."

    # ---- data ---------------------------------------------------------------------------------
    # The four per-example hooks a kind over other examples (chat) overrides.
    def encode_one(self, ex: QAExample) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one teacher-forced example."""
        return encode_example(self.tokenizer, ex, self.max_length)

    def prompt_of(self, ex: QAExample) -> list[int]:
        """The token ids greedy decoding continues."""
        return prompt_ids(self.tokenizer, ex.question)

    @staticmethod
    def reference_of(ex: QAExample) -> str:
        return ex.answer

    @staticmethod
    def matches(prediction: str, reference: str) -> bool:
        return exact_match(prediction, reference)

    def encode(self, examples: Sequence[QAExample]) -> Batch:
        return collate([self.encode_one(e) for e in examples], self.pad_id)

    def batches(
        self,
        split: Sequence[QAExample],
        batch_size: int,
        *,
        shuffle_seed: int | None = None,
        length_pool: int | None = None,
    ) -> Iterator[Batch]:
        if length_pool is None:
            for idx in chunks(shuffled(len(split), shuffle_seed), batch_size):
                yield self.encode([split[i] for i in idx])
            return
        encoded = [self.encode_one(e) for e in split]
        lengths = [len(ids) for ids, _ in encoded]
        for idx in length_grouped(lengths, batch_size, length_pool, shuffle_seed):
            yield collate([encoded[i] for i in idx], self.pad_id)

    def prepare(self, split: Sequence[QAExample], batch_size: int) -> list[ScoreBatch]:
        out = []
        for idx in chunks(list(range(len(split))), batch_size):
            exs = [split[i] for i in idx]
            out.append(
                ScoreBatch(
                    self.encode(exs),
                    [self.prompt_of(e) for e in exs],
                    [self.reference_of(e) for e in exs],
                )
            )
        return out

    def gram_batches(self, split: Sequence[QAExample], n: int, batch_size: int) -> list[ScoreBatch]:
        """``n`` seeded examples of ``split`` (RegMean's unlabelled inputs)."""
        return self.prepare(fixed_subset(split, n), batch_size)

    def model_inputs(self, sb: ScoreBatch) -> dict[str, Tensor]:
        return {k: sb.batch[k].to(self.device) for k in ("input_ids", "attention_mask")}

    # ---- model --------------------------------------------------------------------------------
    def _forward(self, overrides: dict[str, Tensor] | None, **kwargs):
        return forward_with(self.model, overrides, **kwargs)

    def loss(self, batch: Batch, overrides: dict[str, Tensor] | None = None) -> Tensor:
        """Mean answer-token cross-entropy. The LM head runs only at the positions that predict an
        answer token (a few of a prompt's ~100): on a 135M model with a 49k vocabulary the head
        is about a fifth of a training step's compute."""
        b = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        keep = answer_positions(b["labels"]) if takes_logits_to_keep(self.model.lm) else None
        extra = {} if keep is None else {"logits_to_keep": keep}
        with self.precision.autocast():
            out = self._forward(
                overrides, input_ids=b["input_ids"], attention_mask=b["attention_mask"], **extra
            )
        if keep is None:
            return answer_loss(out.logits, b["labels"])
        return kept_answer_loss(out.logits, b["labels"], keep)

    def generate(
        self, prompts: Sequence[Sequence[int]], overrides: dict[str, Tensor] | None = None,
        batch_size: int = 32,
    ) -> list[str]:  # fmt: skip
        """Greedy completions of tokenised prompts, decoded."""

        def forward(**kw):
            return self._forward(overrides, **kw)

        with self.precision.autocast():
            ids = greedy_generate(
                forward, prompts, max_new_tokens=self.max_new_tokens,
                eos_ids=[self.tokenizer.eos_token_id], pad_id=self.pad_id, device=self.device,
                batch_size=batch_size, last_logits_only=takes_logits_to_keep(self.model.lm),
            )  # fmt: skip
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def score_batches(
        self, batches: Sequence[ScoreBatch], overrides: dict[str, Tensor] | None = None
    ) -> tuple[float, float]:
        """(answer-token cross-entropy, exact match of greedy answers) over prepared batches."""
        was = self.model.training
        self.model.eval()
        total, tokens, hits, n = 0.0, 0, 0, 0
        for sb in batches:
            b = {k: v.to(self.device) for k, v in sb.batch.items()}
            with self.precision.autocast():
                out = self._forward(
                    overrides, input_ids=b["input_ids"], attention_mask=b["attention_mask"]
                )
            total += float(answer_loss(out.logits, b["labels"], reduction="sum"))
            tokens += int((b["labels"][:, 1:] != IGNORE).sum())
            preds = self.generate(sb.prompts, overrides, batch_size=len(sb.prompts))
            hits += sum(self.matches(p, g) for p, g in zip(preds, sb.answers, strict=True))
            n += len(sb.answers)
        self.model.train(was)
        return total / max(tokens, 1), hits / max(n, 1)

    def score(self, split: Sequence[QAExample], *, batch_size: int = 32) -> tuple[float, float]:
        return self.score_batches(self.prepare(split, batch_size))

    # ---- weights ------------------------------------------------------------------------------
    def backbone(self) -> nn.Module:
        return _unwrapped(self.model.lm).base_model

    def use(
        self, data: QASplits, heads: Mapping[str, Tensor] | None = None, slug: str = ""
    ) -> None:
        """Adopt ``data``'s sequence-length settings (QA models have no per-dataset head)."""
        self.max_length = data.max_length
        self.max_new_tokens = data.max_new_tokens

    @staticmethod
    def head_tensors(slug: str) -> dict[str, Tensor]:
        return {}

    @staticmethod
    def head_info(data: QASplits) -> HeadInfo:
        return HeadInfo(dataset=data.name, labels=[])

    def attach_lora(self, *, r: int, alpha: int, dropout: float, target_modules: Any) -> nn.Module:
        """Wrap the LM in a peft LoRA adapter (all linear layers but the LM head by default)."""
        self.model.lm = wrap_with_lora(
            self.model.lm, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules,
            task_type="CAUSAL_LM",
        )  # fmt: skip
        return self.model.lm

    def release_state(self) -> dict[str, Tensor]:
        """The backbone's weights in base key names (a LoRA adapter materialised first)."""
        if hasattr(self.model.lm, "merge_and_unload"):
            self.model.lm = self.model.lm.merge_and_unload()
        return state_on_cpu(self.backbone())


def freeze_untied_head(lm: nn.Module) -> None:
    """Freeze the output embedding unless it is the input embedding (see the module docstring)."""
    out, inp = lm.get_output_embeddings(), lm.get_input_embeddings()
    if out is not None and (inp is None or out.weight is not inp.weight):
        out.weight.requires_grad_(False)


def load_causal_lm(uri: str, allow_remote_code: bool = False) -> nn.Module:
    """The base's ``AutoModelForCausalLM`` in float32."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(uri), dtype=torch.float32, trust_remote_code=allow_remote_code
    )
    freeze_untied_head(lm)
    return lm.eval()


class QAKind:
    """Question answering with causal LMs: datasets from ``data.qa``, exact-match scoring."""

    name: ClassVar[str] = "qa"
    column_roles: ClassVar[frozenset[str]] = frozenset({"question", "answer"})
    metric: ClassVar[str] = "exact_match"
    supports_poison: ClassVar[bool] = False
    supports_monitor: ClassVar[bool] = False
    build_options: ClassVar[frozenset[str]] = frozenset()

    def load(self, ref: Mapping[str, Any], *, poison: Mapping[str, Any] | None = None) -> QASplits:
        if poison:
            raise ValueError("poisoned (backdoored) training is defined for text datasets only")
        data = load_qa_splits(ref["uri"], columns=ref.get("columns"))
        return cap_splits(data, ref.get("examples"))

    def _task(self, lm: nn.Module, uri: str, device: str, allow_remote_code: bool) -> QATask:

        return QATask(lm, load_tokenizer(uri, allow_remote_code), device=device)

    def build(
        self, base: str, data: QASplits, *, device: str = "cpu", allow_remote_code: bool = False,
        seed: int = 0,
    ) -> QATask:  # fmt: skip
        torch.manual_seed(seed)
        task = self._task(load_causal_lm(base, allow_remote_code), base, device, allow_remote_code)
        task.use(data)
        return task

    def from_artifact(
        self, art: ModelArtifact, *, device: str = "cpu", allow_remote_code: bool = False
    ) -> QATask:
        lm = load_causal_lm(art.base, allow_remote_code)
        load_backbone_weights(lm.base_model, art)
        return self._task(lm, art.base, device, allow_remote_code)
