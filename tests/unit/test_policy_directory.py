"""PolicyDirectory: per-file last-good semantics for local mode."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from steer.source.local import LocalInputs, PolicyDirectory, PolicyReload
from tests.samples import policy_yaml

BAD = "spec:\n  podSelector: {}\n"  # neither ingress nor egress


def good(*names: str, namespace: str = "default") -> str:
    """A file defining one ingress policy per name."""
    return "---\n".join(
        policy_yaml("spec:\n  podSelector: {}\n  ingress: {}\n", n, namespace) for n in names
    )


def bad(name: str = "p") -> str:
    return policy_yaml(BAD, name)


def keys(result: PolicyReload) -> list[str]:
    return [p.key for p in result.policies]


class Dir:
    """A policy directory under test, with its PolicyDirectory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.source = PolicyDirectory(path)

    def write(self, name: str, text: str) -> str:
        (self.path / name).write_text(text)
        return str(self.path / name)

    def remove(self, name: str) -> None:
        (self.path / name).unlink()

    def reload(self) -> PolicyReload:
        return self.source.reload()


@pytest.fixture
def d(tmp_path: Path) -> Dir:
    return Dir(tmp_path)


def test_loads_every_good_file(d: Dir) -> None:
    d.write("a.yaml", good("a1", "a2"))
    d.write("b.yml", good("b"))
    result = d.reload()
    assert sorted(keys(result)) == ["default/a1", "default/a2", "default/b"]
    assert result.errors == ()
    assert result.changed


@pytest.mark.parametrize(
    "name", ["notes.txt", "policy.json", "README", ".web.yaml.swp", "web.yaml~", "WEB.YAML"]
)
def test_non_yaml_files_are_ignored(d: Dir, name: str) -> None:
    d.write(name, "this is not: [a policy")
    result = d.reload()
    assert result == PolicyReload((), (), changed=False)


def test_directory_named_like_yaml_is_ignored(d: Dir) -> None:
    (d.path / "sub.yaml").mkdir()
    assert d.reload() == PolicyReload((), (), changed=False)


def test_missing_directory_is_reported(tmp_path: Path) -> None:
    result = PolicyDirectory(tmp_path / "absent").reload()
    [error] = result.errors
    assert "fix" in error.message


def test_bad_edit_keeps_last_good_policies_and_reports_error(d: Dir) -> None:
    source = d.write("web.yaml", good("web"))
    d.reload()
    d.write("web.yaml", bad("web"))
    result = d.reload()
    assert keys(result) == ["default/web"]
    [error] = result.errors
    assert (error.source, error.path) == (source, "spec")
    assert not result.changed


def test_bad_edit_is_reported_on_every_reload_until_fixed(d: Dir) -> None:
    d.write("web.yaml", good("web"))
    d.reload()
    d.write("web.yaml", bad("web"))
    d.reload()
    assert d.reload().errors
    d.write("web.yaml", good("web2"))
    result = d.reload()
    assert (keys(result), result.errors, result.changed) == (["default/web2"], (), True)


def test_new_bad_file_adds_nothing(d: Dir) -> None:
    d.write("a.yaml", good("a"))
    d.reload()
    source = d.write("b.yaml", good("b") + "---\n" + bad("c"))
    result = d.reload()
    assert keys(result) == ["default/a"]
    assert [e.source for e in result.errors] == [source]
    assert not result.changed


def test_deleting_a_file_removes_its_policies(d: Dir) -> None:
    d.write("a.yaml", good("a"))
    d.write("b.yaml", good("b"))
    d.reload()
    d.remove("b.yaml")
    result = d.reload()
    assert (keys(result), result.changed) == (["default/a"], True)


def test_deleting_a_file_whose_edit_was_rejected_removes_its_last_good(d: Dir) -> None:
    d.write("a.yaml", good("a"))
    d.reload()
    d.write("a.yaml", bad("a"))
    d.reload()
    d.remove("a.yaml")
    result = d.reload()
    assert (keys(result), result.errors, result.changed) == ([], (), True)


def test_second_file_with_same_policy_is_rejected_naming_the_first(d: Dir) -> None:
    first = d.write("a.yaml", good("web"))
    d.reload()
    second = d.write("b.yaml", good("web", "other"))
    result = d.reload()
    assert keys(result) == ["default/web"]
    [error] = result.errors
    assert error.source == second
    assert error.path == "metadata.name"
    assert first in error.message
    assert "fix" in error.message


def test_duplicate_across_files_is_rejected_even_when_loaded_together(d: Dir) -> None:
    first = d.write("a.yaml", good("web"))
    d.write("b.yaml", good("web"))
    result = d.reload()
    assert keys(result) == ["default/web"]
    [error] = result.errors
    assert first in error.message


def test_same_name_in_another_namespace_is_not_a_duplicate(d: Dir) -> None:
    d.write("a.yaml", good("web"))
    d.write("b.yaml", good("web", namespace="shop"))
    assert sorted(keys(d.reload())) == ["default/web", "shop/web"]


def test_duplicate_is_accepted_once_the_owning_file_is_deleted(d: Dir) -> None:
    d.write("a.yaml", good("web"))
    d.write("b.yaml", good("web"))
    d.reload()
    d.remove("a.yaml")
    result = d.reload()
    assert (keys(result), result.errors) == (["default/web"], ())


@pytest.mark.parametrize("owner", ["a.yaml", "z.yaml"])
def test_duplicate_is_accepted_once_the_owning_file_drops_the_name(d: Dir, owner: str) -> None:
    d.write(owner, good("web"))
    d.reload()
    d.write("m.yaml", good("web"))
    assert d.reload().errors
    d.write(owner, good("renamed"))
    result = d.reload()
    assert result.errors == ()
    assert sorted(keys(result)) == ["default/renamed", "default/web"]


def test_changed_is_false_when_nothing_changed(d: Dir) -> None:
    d.write("a.yaml", good("a"))
    assert d.reload().changed
    assert not d.reload().changed


def test_changed_is_false_for_an_empty_directory(d: Dir) -> None:
    assert not d.reload().changed


def test_reverting_a_rejected_edit_is_not_a_change(d: Dir) -> None:
    d.write("a.yaml", good("a"))
    d.reload()
    d.write("a.yaml", bad("a"))
    d.reload()
    d.write("a.yaml", good("a"))
    result = d.reload()
    assert (keys(result), result.errors, result.changed) == (["default/a"], (), False)


def test_digest_is_stable_across_reloads(d: Dir) -> None:
    d.write("a.yaml", good("a"))
    d.reload()
    before = d.source.digest()
    d.reload()
    assert d.source.digest() == before


@pytest.mark.parametrize(
    ("step", "digest_changes"),
    [
        pytest.param(lambda d: d.write("a.yaml", bad("a")), False, id="rejected-edit"),
        pytest.param(lambda d: d.write("b.yaml", bad("b")), False, id="new-bad-file"),
        pytest.param(lambda d: d.write("b.yaml", good("a")), False, id="new-duplicate-file"),
        pytest.param(lambda d: d.write("notes.txt", "x"), False, id="non-yaml-file"),
        pytest.param(lambda d: d.write("a.yaml", good("a", "a2")), True, id="good-edit"),
        pytest.param(lambda d: d.write("b.yaml", good("b")), True, id="new-good-file"),
        pytest.param(lambda d: d.remove("a.yaml"), True, id="file-deleted"),
    ],
)
def test_digest_changes_only_when_the_files_in_force_change(
    d: Dir, step: Callable[[Dir], object], digest_changes: bool
) -> None:
    d.write("a.yaml", good("a"))
    d.reload()
    before = d.source.digest()
    step(d)
    result = d.reload()
    assert (d.source.digest() != before) is digest_changes
    assert result.changed is digest_changes


def test_directory_that_vanishes_keeps_the_policies_in_force(tmp_path: Path) -> None:
    d = Dir(tmp_path / "policies")
    d.path.mkdir()
    d.write("a.yaml", good("web"))
    d.reload()
    d.remove("a.yaml")
    d.path.rmdir()
    result = d.reload()
    assert keys(result) == ["default/web"]
    assert not result.changed
    [error] = result.errors
    assert "not a directory" in error.message


@pytest.mark.parametrize(
    "state",
    ["{not json", '{"pods": [{"name": "a"}]}', '{"pods": [{"name": "a", "ip": "10.0.0.300"}]}'],
    ids=["malformed-json", "missing-ip", "bad-ip"],
)
def test_unreadable_lab_state_keeps_the_last_good_pods(tmp_path: Path, state: str) -> None:
    lab_state = tmp_path / "lab.json"
    lab_state.write_text('{"pods": [{"name": "web", "ip": "10.244.0.3", "veth": "sp1"}]}')
    inputs = LocalInputs(tmp_path, lab_state)
    _, pods = inputs.load()
    lab_state.write_text(state)
    reload, still = inputs.load()
    assert [p.ip for p in still] == [p.ip for p in pods] == ["10.244.0.3"]
    [error] = reload.errors
    assert error.source == str(lab_state)
    assert "fix" in error.message


def test_only_policy_files_and_the_lab_state_trigger_a_reload(tmp_path: Path) -> None:
    inputs = LocalInputs(tmp_path / "policies", tmp_path / "run" / "lab.json")
    policies = tmp_path / "policies"
    assert inputs.affected_by([str(policies / "web.yaml")])
    assert inputs.affected_by([str(policies / "web.yml"), str(policies / ".web.yaml.staged")])
    assert inputs.affected_by([str(tmp_path / "run" / "lab.json")])
    assert not inputs.affected_by([str(policies / ".web.yaml.staged")])
    assert not inputs.affected_by([str(policies / ".web.yaml.swp")])
    assert not inputs.affected_by([str(tmp_path / "run" / "logs" / "agent.log")])
    assert not inputs.affected_by([])


def test_a_write_no_watch_event_announced_is_found_by_stat(tmp_path: Path) -> None:
    """A write between the agent's first load and the moment its watch is set up sends
    no event: the watcher's once-a-second check must still see it."""
    policies, lab_state = tmp_path / "policies", tmp_path / "lab.json"
    policies.mkdir()
    (policies / "a.yaml").write_text(good("a"))
    inputs = LocalInputs(policies, lab_state)
    inputs.load()
    assert not inputs.stale()
    (policies / "b.yaml").write_text(good("b"))
    assert inputs.stale()
    inputs.load()
    assert not inputs.stale()
    lab_state.write_text('{"pods": []}')
    assert inputs.stale()
    inputs.load()
    assert not inputs.stale()
    (policies / "a.yaml").unlink()
    assert inputs.stale()
