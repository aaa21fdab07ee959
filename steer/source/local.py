"""Local mode: policies from a directory of YAML files, pods from the lab's state file."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from steer.model.load import PolicyError, parse_policies
from steer.model.pod import Pod
from steer.model.policy import HTTPPolicy

log = logging.getLogger("steer.source")
POLICY_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class PolicyReload:
    policies: tuple[HTTPPolicy, ...]
    errors: tuple[PolicyError, ...]
    changed: bool


@dataclass
class PolicyDirectory:
    """The policies in force, per file: a file that fails to load keeps its last good
    content in force, so one bad edit never half-applies and never drops good policy."""

    path: Path
    _good: dict[str, tuple[HTTPPolicy, ...]] = field(default_factory=dict)
    _texts: dict[str, str] = field(default_factory=dict)

    def digest(self) -> str:
        """Digest of the files in force (a rejected edit does not count)."""
        return texts_digest({n: t for n, t in self._texts.items() if n in self._good})

    def reload(self) -> PolicyReload:
        errors: list[PolicyError] = []
        present: dict[str, str] = {}
        if not self.path.is_dir():
            errors.append(PolicyError(str(self.path), "", "not a directory; fix: create it"))
        else:
            for file in sorted(self.path.iterdir()):
                if file.suffix in POLICY_SUFFIXES and file.is_file():
                    try:
                        present[str(file)] = file.read_text()
                    except (OSError, UnicodeDecodeError) as exc:
                        errors.append(PolicyError(str(file), "", f"unreadable: {exc}"))
                        present[str(file)] = self._texts.get(str(file), "")

        changed = False
        for name in set(self._good) - set(present):
            del self._good[name]
            self._texts.pop(name, None)
            changed = True
        owners = {p.key: n for n, ps in self._good.items() for p in ps if n in present}
        for name, text in present.items():
            if self._texts.get(name) == text and name in self._good:
                continue
            policies, file_errors = parse_policies(text, name)
            file_errors += [
                PolicyError(
                    name,
                    "metadata.name",
                    f"policy {p.key} is already defined in {owners[p.key]}; fix: rename one",
                )
                for p in policies
                if owners.get(p.key, name) != name
            ]
            if file_errors:
                errors += file_errors
                continue
            self._good[name] = tuple(policies)
            self._texts[name] = text
            owners.update({p.key: name for p in policies})
            changed = True
        for error in errors:
            log.error("policy not applied: %s", error)
        policies_in_force = tuple(p for name in sorted(self._good) for p in self._good[name])
        return PolicyReload(policies_in_force, tuple(errors), changed)


def texts_digest(texts: dict[str, str]) -> str:
    """Identifies a set of policy files by content, so a caller can tell whether the
    agent and control plane have caught up with the directory as it is now."""
    h = hashlib.sha256()
    for name in sorted(texts):
        h.update(f"{Path(name).name}\0{texts[name]}\0".encode())
    return h.hexdigest()[:16]


def directory_texts(path: Path) -> dict[str, str]:
    return {
        str(f): f.read_text()
        for f in sorted(path.iterdir())
        if f.suffix in POLICY_SUFFIXES and f.is_file()
    }


def load_lab_pods(state_file: Path) -> list[Pod]:
    """Pods of the local lab; none if the lab is not up."""
    try:
        state = json.loads(state_file.read_text())
    except FileNotFoundError:
        return []
    return [
        Pod(
            name=p["name"],
            namespace=p.get("namespace", "default"),
            ip=p["ip"],
            labels=p.get("labels", {}),
            annotations=p.get("annotations", {}),
            interface=p.get("veth", ""),
            namespace_labels=p.get("namespace_labels", {}),
        )
        for p in state.get("pods", [])
    ]


def write_json_atomic(path: Path, document: object) -> None:
    """Readers (steer status, the demo) never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2))
    tmp.replace(path)
