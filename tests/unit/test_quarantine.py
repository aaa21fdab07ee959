"""Policies Envoy refused are held back alone; everything else keeps flowing."""

from __future__ import annotations

from steer.control.quarantine import Quarantine
from steer.model.load import parse_policies
from steer.model.policy import HTTPPolicy
from tests.samples import policy_yaml

REASON = "Proto constraint validation failed: invalid regex"


def policy(name: str, path: str = "/x") -> HTTPPolicy:
    spec = (
        "spec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n    rules:\n"
        f"      - http: {{paths: [{{prefix: {path}}}]}}\n"
    )
    [parsed], errors = parse_policies(policy_yaml(spec, name), f"{name}.yaml")
    assert not errors
    return parsed


def test_the_one_policy_that_changed_is_held_with_envoys_reason() -> None:
    q = Quarantine()
    a, b = policy("a"), policy("b")
    pushed = q.admit([a, b])
    assert not q.accepted(pushed)
    bad = policy("b", "/y")
    pushed = q.admit([a, bad])
    assert q.refused(pushed, REASON) == ["default/b"]
    assert q.admit([a, bad]) == [a]
    assert q.report() == [{"policy": "default/b", "reason": REASON}]
    assert not q.accepted([a])
    # Still held while unchanged; an edit is a new attempt.
    assert q.admit([a, bad]) == [a]
    fixed = policy("b", "/z")
    assert q.admit([a, fixed]) == [a, fixed]
    assert q.report() == []


def test_several_changes_at_once_are_tried_again_one_at_a_time() -> None:
    q = Quarantine()
    a, b, c = policy("a"), policy("b"), policy("c")
    pushed = q.admit([a, b, c])
    assert q.refused(pushed, REASON) == ["default/a", "default/b", "default/c"]
    assert q.report() == [], "suspects are not reported as culprits"
    assert q.admit([a, b, c]) == []
    # The empty snapshot is accepted: try a alone, which Envoy accepts too.
    assert q.accepted([])
    pushed = q.admit([a, b, c])
    assert pushed == [a]
    assert q.accepted(pushed)
    pushed = q.admit([a, b, c])
    assert pushed == [a, b]
    # b alone is refused: the culprit.
    assert q.refused(pushed, REASON) == ["default/b"]
    assert q.report() == [{"policy": "default/b", "reason": REASON}]
    pushed = q.admit([a, b, c])
    assert pushed == [a]
    assert q.accepted(pushed)
    assert q.admit([a, b, c]) == [a, c]
    assert not q.accepted([a, c])
    assert q.admit([a, b, c]) == [a, c]


def test_a_refusal_no_policy_change_explains_blames_nothing() -> None:
    q = Quarantine()
    pushed = q.admit([policy("a")])
    q.accepted(pushed)
    assert q.refused(pushed, REASON) == []
    assert q.admit(pushed) == pushed


def test_a_deleted_held_policy_is_forgotten() -> None:
    q = Quarantine()
    a = policy("a")
    q.accepted([])
    q.refused(q.admit([a]), REASON)
    assert q.admit([]) == []
    assert q.held == {}
