"""A study file (YAML) -> validated ``StudySpec`` variants, or a ``StudyError`` naming every problem.

Validation happens in two layers: pydantic checks the shape and types of the document, then
``_check_semantics`` checks what only the rest of mergesec knows (registered ops and their
parameters, dataset and model URIs). Both report ``(key path, message)`` pairs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergesec.orchestrator.errors import StudyError
from mergesec.orchestrator.grid import apply_overrides, expand_grid, grid_paths

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
STEP_NAMES = ("finetune", "protect", "attack", "merge", "evaluate", "monitor")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OpCall(BaseModel):
    """``{op: name, <param>: value, ...}``: which registered op to run and its parameters."""

    model_config = ConfigDict(extra="allow")
    op: str

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class FinetuneSpec(BaseModel):
    """``{mode: full|lora, <param>: value, ...}``; params are those of op ``finetune/<mode>``."""

    model_config = ConfigDict(extra="allow")
    mode: str = "full"

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DatasetSpec(_Strict):
    uri: str
    # Which source columns hold the example: text/label (text), image/label, question/answer (QA).
    columns: dict[Literal["text", "label", "image", "question", "answer"], str] | None = None


class PoisonSpec(_Strict):
    """Train the victim's expert on backdoored data: ``rate`` of non-target examples get ``trigger``
    inserted and are relabelled ``target``."""

    trigger: str = Field(min_length=1)
    target: int = Field(default=0, ge=0)
    rate: float = Field(default=0.1, gt=0, le=1)
    position: Literal["start", "end", "random"] = "random"


class ScenarioSpec(_Strict):
    """How the victim is trained and released, what the attacker does, and what the auditor watches."""

    poison: PoisonSpec | None = None
    protect: OpCall | None = None
    attack: OpCall | None = None
    monitor: OpCall | None = None


class DiagnosticsSpec(_Strict):
    """Extra measurements: the scale curve (validation loss/accuracy of W₀ + s·τ) of every victim model."""

    scale_curve: bool = False
    scales: list[float] = Field(
        default_factory=lambda: [round(-0.5 + 0.1 * i, 2) for i in range(26)]
    )


class Resources(_Strict):
    cpu: float = Field(default=1.0, ge=0)
    gpu: float = Field(default=0.0, ge=0)
    # Seconds a node of this step may run before it is failed (None: no limit).
    timeout: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _something(self) -> Resources:
        if self.cpu == 0 and self.gpu == 0:
            raise ValueError("cpu and gpu cannot both be 0")
        if self.gpu > 1:
            # An op runs on one device; reserving more GPUs would leave them idle.
            raise ValueError(
                f"gpu is {self.gpu:g}, but an op runs on one device: ask for at most 1 "
                "(a fraction shares a GPU between nodes)"
            )
        return self


class EvaluateSpec(_Strict):
    split: Literal["test", "validation"] = "test"
    batch_size: int = Field(default=64, ge=1)
    # Validation examples per dataset that score each `{search: [...]}` candidate (None: all).
    search_examples: int | None = Field(default=None, ge=1)


class TrackingSpec(_Strict):
    log_weights: bool = False
    experiment: str | None = None


class StudySpec(_Strict):
    study: str
    base: str
    datasets: list[str | DatasetSpec] = Field(min_length=1)
    finetune: FinetuneSpec = FinetuneSpec()
    scenarios: dict[str, ScenarioSpec] = Field(min_length=1)
    victims: list[str] | Literal["all"] = "all"
    merge: OpCall
    evaluate: EvaluateSpec = EvaluateSpec()
    resources: dict[
        Literal["finetune", "protect", "attack", "merge", "evaluate", "monitor"], Resources
    ] = {}
    tracking: TrackingSpec = TrackingSpec()
    diagnostics: DiagnosticsSpec = DiagnosticsSpec()
    retries: int = Field(default=0, ge=0, le=10)
    allow_remote_code: bool = False

    @field_validator("study")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("must be 1-64 characters of letters, digits, '_', '.', '+', '-'")
        return v

    @field_validator("scenarios")
    @classmethod
    def _scenario_names(cls, v: dict[str, ScenarioSpec]) -> dict[str, ScenarioSpec]:
        for name in v:
            if not NAME_RE.match(name):
                raise ValueError(
                    f"scenario name {name!r} must be letters, digits, '_', '.', '+', '-'"
                )
        return v

    def dataset_specs(self) -> list[DatasetSpec]:
        return [d if isinstance(d, DatasetSpec) else DatasetSpec(uri=d) for d in self.datasets]

    def dataset_uris(self) -> list[str]:
        return [d.uri for d in self.dataset_specs()]

    def victim_uris(self) -> list[str]:
        return self.dataset_uris() if self.victims == "all" else list(self.victims)

    def resources_for(self, step: str) -> Resources:
        return self.resources.get(step, Resources())  # type: ignore[arg-type]


class Study:
    """A loaded study: its file, raw document, and one validated spec per grid variant."""

    def __init__(
        self, file: str, raw: dict[str, Any], variants: list[tuple[dict[str, str], StudySpec]]
    ):
        self.file = file
        self.raw = raw
        self.variants = variants

    @property
    def name(self) -> str:
        return self.variants[0][1].study

    @property
    def spec(self) -> StudySpec:
        return self.variants[0][1]


def load_study(path: str | Path, overrides: list[str] | None = None) -> Study:
    """Read, override, expand and validate a study file. Raises ``StudyError`` with every problem."""
    file = str(path)
    p = Path(path)
    if not p.is_file():
        raise StudyError(file, [("", "study file not found")])
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise StudyError(file, [("", f"not valid YAML: {where}{problem}")]) from None
    if not isinstance(raw, dict):
        raise StudyError(file, [("", "a study must be a YAML mapping (key: value lines)")])
    try:
        raw = apply_overrides(raw, overrides or [])
    except ValueError as e:
        raise StudyError(file, [("--set", str(e))]) from None
    for gpath, values in grid_paths(raw):
        if not isinstance(values, list) or not values:
            raise StudyError(
                file, [(".".join(gpath) + ".grid", "grid needs a non-empty list of values")]
            )

    variants: list[tuple[dict[str, str], StudySpec]] = []
    problems: list[tuple[str, str]] = []
    for label, doc in expand_grid(raw):
        try:
            spec = StudySpec.model_validate(doc)
        except ValidationError as e:
            problems.extend(_pydantic_problems(e, label))
            continue
        problems.extend(_check_semantics(spec))
        variants.append((label, spec))
    if problems:
        raise StudyError(file, _unique(problems))
    return Study(file, raw, variants)


def _unique(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen, out = set(), []
    for p in problems:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def _pydantic_problems(e: ValidationError, label: dict[str, str]) -> list[tuple[str, str]]:
    out = []
    for err in e.errors():
        loc = [str(x) for x in err["loc"]]
        # Union members add their type name to the path (e.g. datasets.0.str); drop those.
        loc = [
            x
            for x in loc
            if x not in {"str", "DatasetSpec", "list[str]", "literal['all']", "[key]"}
        ]
        path = ".".join(loc)
        kind = err["type"]
        if kind == "extra_forbidden":
            msg = f"unknown key {loc[-1]!r}"
            path = ".".join(loc)
        elif kind == "missing":
            msg = "required key is missing"
        else:
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            if (
                "input" in err
                and kind not in {"value_error"}
                and not isinstance(err["input"], dict)
            ):
                msg = f"{msg} (got {err['input']!r})"
        out.append((path, msg))
    return out


def _check_semantics(spec: StudySpec) -> list[tuple[str, str]]:
    from mergesec.core.registry import OpError, get_op, validate_params
    from mergesec.data import check_dataset_uri
    from mergesec.models.hub import check_model_uri

    problems: list[tuple[str, str]] = []
    msg = check_model_uri(spec.base)
    if msg:
        problems.append(("base", msg))
    for i, d in enumerate(spec.dataset_specs()):
        msg = check_dataset_uri(d.uri)
        if msg:
            problems.append((f"datasets.{i}", msg))
    uris = spec.dataset_uris()
    if len(set(uris)) != len(uris):
        problems.append(("datasets", "a dataset is listed twice"))
    if spec.victims != "all":
        for i, v in enumerate(spec.victims):
            if v not in uris:
                problems.append(
                    (f"victims.{i}", f"{v!r} is not one of the study's datasets: {', '.join(uris)}")
                )

    def check(step: str, name: str, params: dict[str, Any], path: str, op_key: str = "op") -> None:
        try:
            op = get_op(step, name, f"{path}.{op_key}")
            validate_params(op, params, path)
        except OpError as e:
            problems.append((e.path, str(e)))

    check("finetune", spec.finetune.mode, spec.finetune.params, "finetune", "mode")
    try:
        from mergesec.tasks.kinds import kind_for_datasets

        kind = kind_for_datasets([d.model_dump(exclude_none=True) for d in spec.dataset_specs()])
    except ValueError as e:
        problems.append(("datasets", str(e)))
        kind = "mixed"
    for name, sc in spec.scenarios.items():
        if sc.protect is not None:
            check("protect", sc.protect.op, sc.protect.params, f"scenarios.{name}.protect")
        if sc.attack is not None:
            check("attack", sc.attack.op, sc.attack.params, f"scenarios.{name}.attack")
        if sc.monitor is not None:
            check("monitor", sc.monitor.op, sc.monitor.params, f"scenarios.{name}.monitor")
            if kind != "text":
                problems.append(
                    (
                        f"scenarios.{name}.monitor",
                        f"monitors watch text classifiers only; this study's datasets are {kind}",
                    )
                )
    check("merge", spec.merge.op, spec.merge.params, "merge")
    return problems
