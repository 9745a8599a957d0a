"""A node of the plan: one unit of work, named by the hash of what it computes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def node_id(
    step: str, op: str, version: str, params: dict[str, Any], inputs: dict[str, str]
) -> str:
    payload = canonical_json(
        {"step": step, "op": op, "version": version, "params": params, "inputs": inputs}
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class Node:
    step: str
    op: str
    version: str
    params: dict[str, Any]
    inputs: dict[str, str]  # role -> upstream node id
    id: str = ""
    # Human-facing facts that do not change what is computed (not hashed): scenarios, datasets.
    labels: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.id:
            self.id = node_id(self.step, self.op, self.version, self.params, self.inputs)

    @property
    def op_key(self) -> str:
        return f"{self.step}/{self.op}"

    def title(self) -> str:
        what = ",".join(self.labels.get("what", [])) or self.id[:8]
        return f"{self.step}/{self.op} {what}"

    def add_label(self, key: str, value: str) -> None:
        vals = self.labels.setdefault(key, [])
        if value not in vals:
            vals.append(value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "step": self.step,
            "op": self.op,
            "version": self.version,
            "params": self.params,
            "inputs": self.inputs,
            "labels": self.labels,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Node:
        return cls(
            d["step"], d["op"], d["version"], d["params"], d["inputs"], d["id"], d.get("labels", {})
        )
