"""The YAML reader of study files and ``--set`` values.

PyYAML follows YAML 1.1, where ``1e-3`` (no dot) is a string; studies are validated strictly, so
that would be refused as "not a number". Floats are read as YAML 1.2 writes them, and a key given
twice in one mapping is an error instead of silently keeping the last value.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

_FLOAT_12 = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
MERGE_TAG = "tag:yaml.org,2002:merge"


class StudyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 floats and no duplicate keys."""


def _mapping_without_duplicates(loader: StudyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == MERGE_TAG:  # `<<: *anchor`: merged keys may be overridden
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key (a list): construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


StudyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates
)
StudyLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """The value of one YAML document, read with ``StudyLoader``."""
    return yaml.load(text, Loader=StudyLoader)  # noqa: S506 (a SafeLoader subclass)
