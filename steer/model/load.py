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
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)  # `<<` merge keys, as the base class would
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            # Every key in a policy is a string; any other (`? [a]`, `1:`, `on:`) is a
            # mistake, and a list or mapping key could not even be hashed.
            if not isinstance(key, str):
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"mapping key {_key_kind(key)} is not a string; fix: write the key as a "
                    "plain string (quote it if YAML reads it as something else)",
                    key_node.start_mark,
                )
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


def _key_kind(key: object) -> str:
    if isinstance(key, list | dict):
        return f"({'a list' if isinstance(key, list) else 'a mapping'})"
    name = type(key).__name__
    return f"{_shown(key)} ({'an' if name[0] in 'aeiou' else 'a'} {name})"


def _shown(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def _unexpected(source: str, path: str, exc: BaseException) -> PolicyError:
    """An error for a failure no check anticipated: still one refused input, never a crash
    of the process that read it."""
    what = "nested too deeply" if isinstance(exc, RecursionError) else type(exc).__name__
    return PolicyError(
        source,
        path,
        f"could not be loaded ({what}: {_shown(str(exc), 200)}); fix: simplify the input, "
        "and check it against docs/policy-reference.md",
    )


def validate_policy(document: Any, source: str, prefix: str = "") -> HTTPPolicy | list[PolicyError]:
    """One HTTPPolicy document (from YAML, or as the API server returns it), or its errors,
    each naming the field path and the fix. Never raises: whatever the document holds,
    the worst outcome is that this one policy is refused."""
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
        try:
            return [
                PolicyError(source, prefix + _field_path(e["loc"]), _describe(e))
                for e in exc.errors()
            ]
        except Exception as inner:  # an error that cannot even be described
            return [_unexpected(source, prefix.rstrip(": "), inner)]
    except Exception as exc:  # RecursionError, or a validator's own bug
        return [_unexpected(source, prefix.rstrip(": "), exc)]


def parse_policies(text: str, source: str) -> tuple[list[HTTPPolicy], list[PolicyError]]:
    """Every document in `text`, or the errors that stop it loading.

    A file is all or nothing: if one document fails, none of its policies is returned, so a
    half-edited file never half-applies. Never raises: a file that cannot be loaded, for
    whatever reason, comes back as errors naming it.
    """
    try:
        return _parse_policies(text, source)
    except Exception as exc:
        return [], [_unexpected(source, "", exc)]


def _parse_policies(text: str, source: str) -> tuple[list[HTTPPolicy], list[PolicyError]]:
    try:
        documents = [d for d in yaml.load_all(text, Loader=_UniqueKeyLoader) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        if "fix:" not in problem:
            problem += "; fix the syntax"
        return [], [PolicyError(source, where, f"malformed YAML: {problem}")]
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        # PyYAML's own constructors raise these for values they cannot build (a timestamp
        # like 2024-13-45, a key that cannot be hashed).
        return [], [_unexpected(source, "", exc)]

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
