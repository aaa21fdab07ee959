"""YAML text to validated policies, with errors an operator can act on.

Pure: the caller reads the file; this module never touches the filesystem.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

from steer.model.policy import HTTPPolicy

_FIX_BY_ERROR_TYPE = {
    "extra_forbidden": "remove it, or check its spelling against docs/policy-reference.md",
    "missing": "add it",
    "literal_error": "use one of the allowed values",
    "enum": "use one of the allowed values",
    "int_parsing": "write a whole number",
    "int_from_float": "write a whole number",
    "int_type": "write a whole number",
    "string_type": "write a string",
    "bool_type": "write true or false",
    "list_type": "write a list",
    "tuple_type": "write a list",
    "dict_type": "write a mapping",
    "model_type": "write a mapping",
    "model_attributes_type": "write a mapping",
}


# libyaml's parser where PyYAML has it (its wheels do): the pure-Python one spent 50 ms on
# a 100-rule policy, the bulk of a policy change's latency.
_SafeLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_SafeLoader):  # type: ignore[misc]
    """Safe loading that refuses a repeated key: plain YAML keeps the last one silently,
    so a second `action:` could turn a Deny into an Allow unseen."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} appears twice in one mapping; fix: keep one",
                    key_node.start_mark,
                )
            seen.add(key)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


@dataclass(frozen=True)
class PolicyError:
    source: str
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}: {self.path}" if self.path else self.source
        return f"{where}: {self.message}"


def _field_path(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _describe(err: Any) -> str:
    message = str(err["msg"]).removeprefix("Value error, ")
    if "fix:" in message:
        return message
    fix = _FIX_BY_ERROR_TYPE.get(err["type"])
    return f"{message}; fix: {fix}" if fix else message


def validate_policy(document: Any, source: str, prefix: str = "") -> HTTPPolicy | list[PolicyError]:
    """One HTTPPolicy document (from YAML, or as the API server returns it), or its errors,
    each naming the field path and the fix."""
    if not isinstance(document, dict):
        return [
            PolicyError(
                source,
                prefix.rstrip(": "),
                "expected a mapping; fix: start the document with `apiVersion: "
                "steer.dev/v1alpha1` and `kind: HTTPPolicy`",
            )
        ]
    try:
        return HTTPPolicy.model_validate(document)
    except ValidationError as exc:
        return [
            PolicyError(source, prefix + _field_path(e["loc"]), _describe(e)) for e in exc.errors()
        ]


def parse_policies(text: str, source: str) -> tuple[list[HTTPPolicy], list[PolicyError]]:
    """Every document in `text`, or the errors that stop it loading.

    A file is all or nothing: if one document fails, none of its policies is returned, so a
    half-edited file never half-applies.
    """
    try:
        documents = [d for d in yaml.load_all(text, Loader=_UniqueKeyLoader) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        return [], [PolicyError(source, where, f"malformed YAML: {problem}; fix the syntax")]

    if not documents:
        # An editor that rewrites a file in place truncates it first; taking that moment
        # for "no policies" would open every pod the file protects.
        return [], [
            PolicyError(
                source,
                "",
                "the file holds no policy; fix: delete the file to remove its policies "
                "(an empty file is taken as an edit in progress)",
            )
        ]
    policies: list[HTTPPolicy] = []
    errors: list[PolicyError] = []
    for index, doc in enumerate(documents):
        prefix = f"document {index}: " if len(documents) > 1 else ""
        result = validate_policy(doc, source, prefix)
        if isinstance(result, HTTPPolicy):
            policies.append(result)
        else:
            errors.extend(result)
    if errors:
        return [], errors
    duplicates = _duplicate_keys(policies, source)
    return ([], duplicates) if duplicates else (policies, [])


def _duplicate_keys(policies: list[HTTPPolicy], source: str) -> list[PolicyError]:
    seen: set[str] = set()
    errors = []
    for policy in policies:
        if policy.key in seen:
            errors.append(
                PolicyError(
                    source,
                    "metadata.name",
                    f"policy {policy.key} is defined twice; fix: rename one",
                )
            )
        seen.add(policy.key)
    return errors
