"""Hostile and malformed inputs: each is refused alone, naming its file and field with a
fix, and none stops the loader, the webhook, the control plane or the agent.

A corpus of concrete inputs from the security issue (the inputs that used to crash, and
the regexes Envoy refuses), replayed through every entry point that reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp.test_utils
import pytest
import re2
import yaml

from steer.cli import main
from steer.constants import WEBHOOK_VALIDATE_POLICIES_PATH
from steer.control import admission
from steer.control.plane import LocalControlPlane
from steer.control.webhook import build_app
from steer.model.load import PolicyError, parse_policies, validate_policy
from steer.model.policy import ENVOY_MAX_PROGRAM_SIZE, HTTPPolicy
from steer.node import agent as agent_module
from steer.node.agent import LocalAgent
from steer.source.kubeobjects import PolicyValidator, policy_status
from steer.source.local import LocalInputs, PolicyDirectory

SOURCE = "policies/web.yaml"
RULES = "spec.ingress.rules"
PATH0 = f"{RULES}[0].http.paths[0]"
HEADER0 = f"{RULES}[0].http.headers[0]"


def policy_doc(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "steer.dev/v1alpha1",
        "kind": "HTTPPolicy",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}} | spec,
    }


def ingress(*rules: dict[str, Any]) -> dict[str, Any]:
    return policy_doc(ingress={"rules": list(rules)})


def path_regex(regex: str) -> str:
    return yaml.safe_dump(ingress({"http": {"paths": [{"regex": regex}]}}))


def header_regex(regex: str) -> str:
    return yaml.safe_dump(ingress({"http": {"headers": [{"name": "x-a", "regex": regex}]}}))


NESTED_GROUPS = "(" * 1200 + "a" + ")" * 1200

# Regexes Python's `re` took and Envoy's RE2 refuses (or that crashed `re` itself).
ENVOY_REFUSES = {
    "end-of-text-Z": (r"\Z", "invalid escape sequence"),
    "verbose-flag": ("(?x)a b", "invalid perl operator"),
    "unicode-flag": ("(?u)a", "invalid perl operator"),
    "comment": ("(?#comment)a", "(?#"),
    "possessive": ("a*+", "bad repetition operator"),
    "repeat-1001": ("a{1001}", "repeat at most 1000"),
    "unicode-escape": (r"\u0041", "invalid escape sequence"),
    "lookahead": ("/(?!admin)", "lookahead"),
    "backreference": (r"(a)\1", "invalid escape sequence"),
    "program-size": ("[a-z]{200}", "program of size"),
    "unicode-class-size": (r"\pL+", "program of size"),
    "nested-1200-groups": (NESTED_GROUPS, "program of size"),
    "overflowing-repeat": ("a{4294967295}", "literal text"),
    "leading-zero-repeat": ("a{01}", "literal text"),
    "no-minimum-repeat": ("a{,5}", "literal text"),
    "empty": ("", "empty"),
}

# (YAML text, the field path named, a fragment of the message)
CORPUS: dict[str, tuple[str, str, str]] = {
    "non-string-key": ("? [a]\n: b\n", "line 1, column 3", "not a string"),
    "int-key": ("1: b\n", "line 1, column 1", "not a string"),
    "bad-timestamp": ("a: 2024-13-45\n", "", "could not be loaded"),
    **{
        f"path-{name}": (path_regex(regex), PATH0, fragment)
        for name, (regex, fragment) in ENVOY_REFUSES.items()
    },
    **{
        f"header-{name}": (header_regex(regex), HEADER0, fragment)
        for name, (regex, fragment) in ENVOY_REFUSES.items()
    },
    "header-name-newline": (
        yaml.safe_dump(ingress({"http": {"headers": [{"name": "x-foo\n", "present": True}]}})),
        f"{HEADER0}.name",
        "header name",
    ),
    "header-empty-prefix": (
        yaml.safe_dump(ingress({"http": {"headers": [{"name": "x-a", "prefix": ""}]}})),
        HEADER0,
        "empty",
    ),
    "host-newline": (
        yaml.safe_dump(ingress({"http": {"hosts": ["web.example\n"]}})),
        f"{RULES}[0].http.hosts",
        "DNS name",
    ),
    "host-too-long-for-envoy": (
        yaml.safe_dump(ingress({"http": {"hosts": ["a" * 120 + ".example"]}})),
        f"{RULES}[0].http.hosts",
        "program size",
    ),
    "name-newline": (
        yaml.safe_dump(policy_doc(ingress={}) | {"metadata": {"name": "web\n"}}),
        "metadata.name",
        "DNS subdomain",
    ),
    "namespace-newline": (
        yaml.safe_dump(policy_doc(ingress={}) | {"metadata": {"name": "w", "namespace": "d\n"}}),
        "metadata.namespace",
        "DNS label",
    ),
    "duplicate-ingress-rule-names": (
        yaml.safe_dump(ingress({"name": "a"}, {"name": "b"}, {"name": "a", "action": "Deny"})),
        f"{RULES}[2].name",
        "rules[0]",
    ),
    "duplicate-egress-rule-names": (
        yaml.safe_dump(policy_doc(egress={"rules": [{"name": "x"}, {"name": "x"}]})),
        "spec.egress.rules[1].name",
        "rules[0]",
    ),
    "name-of-a-default-rule": (
        yaml.safe_dump(ingress({}, {"name": "ingress[0]", "action": "Deny"})),
        f"{RULES}[1].name",
        "unnamed rules",
    ),
    "egress-default-name": (
        yaml.safe_dump(policy_doc(egress={"rules": [{"name": "egress[7]"}]})),
        "spec.egress.rules[0].name",
        "unnamed rules",
    ),
}


@pytest.mark.parametrize(("text", "path", "fragment"), CORPUS.values(), ids=CORPUS.keys())
def test_corpus_input_is_refused_naming_the_field_and_a_fix(
    text: str, path: str, fragment: str
) -> None:
    policies, errors = parse_policies(text, SOURCE)
    assert policies == []
    assert [e.path for e in errors] == [path], errors
    [error] = errors
    assert error.source == SOURCE
    assert fragment in error.message
    assert "fix:" in error.message
    assert len(str(error)) < 1000, "a hostile value must not become a huge message"


@pytest.mark.parametrize(
    ("rule", "path"),
    [
        ({"name": "a\ud800"}, f"{RULES}[0].name"),
        ({"http": {"paths": [{"regex": "a\ud800"}]}}, PATH0),
        ({"http": {"paths": [{"prefix": "/\ud800"}]}}, PATH0),
        ({"http": {"headers": [{"name": "x-a", "exact": "\udfff"}]}}, HEADER0),
    ],
    ids=["rule-name", "regex", "path-prefix", "header-value"],
)
def test_lone_surrogates_are_refused(rule: dict[str, Any], path: str) -> None:
    """JSON (an API object, an AdmissionReview) can spell a lone surrogate, which no
    protobuf message can carry: rendering it would raise (libyaml refuses it already)."""
    result = validate_policy(ingress(rule), SOURCE)
    assert isinstance(result, list)
    assert [(e.path, "surrogate" in e.message) for e in result] == [(path, True)]


def test_the_crashing_inputs_of_the_issue_are_refused() -> None:
    """The three that raised out of parse_policies (TypeError, OverflowError,
    RecursionError) and so stopped `steer control` and `steer agent`."""
    for text in ("? [a]\n: b\n", path_regex("a{4294967295}"), path_regex(NESTED_GROUPS)):
        policies, errors = parse_policies(text, SOURCE)
        assert policies == [] and errors


@pytest.mark.parametrize(
    "regex",
    ["/items/[0-9]+", "^/v[0-9]+/.*$", "(?i)/api/.*", r"\d{3}-\d{4}", "a{2,5}", r"\{1001\}"],
)
def test_regexes_envoy_accepts_load(regex: str) -> None:
    policies, errors = parse_policies(path_regex(regex), SOURCE)
    assert errors == [] and len(policies) == 1


def test_program_size_limit_is_envoys_to_the_instruction() -> None:
    """Envoy refuses a forward RE2 program larger than 100 (re2.max_program_size
    .error_level): 100 loads, 101 does not."""
    sizes = {n: re2.compile(f"a{{{n}}}").programsize for n in range(80, 110)}
    at_limit = next(n for n, size in sizes.items() if size == ENVOY_MAX_PROGRAM_SIZE)
    assert parse_policies(path_regex(f"a{{{at_limit}}}"), SOURCE)[1] == []
    [error] = parse_policies(path_regex(f"a{{{at_limit + 1}}}"), SOURCE)[1]
    assert "program of size 101" in error.message


def test_same_rule_name_in_both_sections_is_fine() -> None:
    """Names are unique per section: ingress and egress rules are never rendered together."""
    doc = policy_doc(ingress={"rules": [{"name": "a"}]}, egress={"rules": [{"name": "a"}]})
    assert parse_policies(yaml.safe_dump(doc), SOURCE)[1] == []


# --- one bad file never stops the others ---------------------------------------------------


def test_each_bad_file_is_refused_alone_and_good_files_load(tmp_path: Path) -> None:
    good = yaml.safe_dump(policy_doc(ingress={}) | {"metadata": {"name": "good"}})
    (tmp_path / "good.yaml").write_text(good)
    for index, (text, _, _) in enumerate(CORPUS.values()):
        (tmp_path / f"bad-{index:02d}.yaml").write_text(text)
    reload = PolicyDirectory(tmp_path).reload()
    assert [p.key for p in reload.policies] == ["default/good"]
    refused = {Path(e.source).name for e in reload.errors}
    assert refused == {f"bad-{i:02d}.yaml" for i in range(len(CORPUS))}


def test_a_bad_edit_keeps_the_files_last_good_policies(tmp_path: Path) -> None:
    file = tmp_path / "web.yaml"
    file.write_text(path_regex("/ok"))
    directory = PolicyDirectory(tmp_path)
    assert [p.key for p in directory.reload().policies] == ["default/web"]
    file.write_text(path_regex(NESTED_GROUPS))
    reload = directory.reload()
    assert [p.key for p in reload.policies] == ["default/web"]
    assert [e.path for e in reload.errors] == [PATH0]


def test_any_exception_while_loading_a_file_is_contained_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from steer.source import local

    def explode(text: str, source: str) -> tuple[list[HTTPPolicy], list[PolicyError]]:
        if source.endswith("boom.yaml"):
            raise MemoryError("a bug")
        return parse_policies(text, source)

    monkeypatch.setattr(local, "parse_policies", explode)
    (tmp_path / "good.yaml").write_text(path_regex("/ok"))
    (tmp_path / "boom.yaml").write_text("anything")
    reload = PolicyDirectory(tmp_path).reload()
    assert [p.key for p in reload.policies] == ["default/web"]
    assert [Path(e.source).name for e in reload.errors] == ["boom.yaml"]


# --- `steer render xds`: what Envoy would refuse never gets that far -----------------------


@pytest.mark.parametrize(
    ("text", "path"),
    [
        (path_regex("a{1001}"), PATH0),
        (path_regex(r"\Z"), PATH0),
        (header_regex("[a-z]{200}"), HEADER0),
        (yaml.safe_dump(ingress({"name": "a"}, {"name": "a"})), f"{RULES}[1].name"),
        ("? [a]\n: b\n", "line 1, column 3"),
    ],
    ids=["repeat-1001", "end-of-text-Z", "program-size", "duplicate-name", "non-string-key"],
)
def test_render_xds_refuses_what_envoy_would_with_exit_1_and_the_field_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, path: str
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "web.yaml").write_text(text)
    code = main(
        ["render", "xds", "--policies", str(policies), "--lab-state", str(tmp_path / "none.json")]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert f"web.yaml: {path}: " in err
    assert "fix:" in err


# --- API objects and admission -------------------------------------------------------------


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"a": [value]}
    return value


def test_deeply_nested_object_is_one_refused_policy() -> None:
    doc = ingress({"http": {"paths": [{"regex": NESTED_GROUPS}]}})
    doc["metadata"]["annotations"] = nested(600)
    result = validate_policy(doc, "HTTPPolicy default/web")
    assert isinstance(result, list) and result


@pytest.mark.parametrize(
    "obj",
    [
        ingress({"http": {"paths": [{"regex": NESTED_GROUPS}]}}),
        ingress({"http": {"paths": [{"regex": "a{4294967295}"}]}}),
        ingress({"name": "a"}, {"name": "a"}),
        policy_doc(ingress={}) | {"metadata": "not a mapping"},
        policy_doc(ingress={}) | {"metadata": {"name": nested(900), "generation": "x"}},
        policy_doc(ingress={}) | {"spec": nested(900)},
    ],
    ids=["nested-groups", "overflow", "duplicate-names", "bad-metadata", "deep-name", "deep-spec"],
)
def test_cluster_validator_refuses_one_object_and_keeps_the_rest(obj: dict[str, Any]) -> None:
    good = policy_doc(ingress={}) | {"metadata": {"name": "good", "resourceVersion": "1"}}
    results = PolicyValidator().validate([obj, good])
    bad, ok = results
    assert bad.policy is None and bad.errors
    assert ok.policy is not None and ok.key == "default/good"
    status = policy_status(bad, None, {}, 0, "2026-01-01T00:00:00Z")
    accepted = status["conditions"][0]
    assert (accepted["type"], accepted["status"]) == ("Accepted", "False")
    assert "fix" in accepted["message"]


def policy_review(obj: Any) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u1",
            "kind": {"group": "steer.dev", "version": "v1alpha1", "kind": "HTTPPolicy"},
            "resource": {"group": "steer.dev", "version": "v1alpha1", "resource": "httppolicies"},
            "operation": "CREATE",
            "userInfo": {"username": "someone"},
            "namespace": "default",
            "object": obj,
        },
    }


@pytest.mark.parametrize(
    ("obj", "path"),
    [
        (ingress({"http": {"paths": [{"regex": NESTED_GROUPS}]}}), PATH0),
        (ingress({"http": {"paths": [{"regex": "(?x)a"}]}}), PATH0),
        (ingress({"name": "a"}, {"name": "a"}), f"{RULES}[1].name"),
        (ingress({"name": "egress[0]"}), f"{RULES}[0].name"),
        (policy_doc(ingress={}) | {"status": nested(900)}, ""),
    ],
    ids=["nested-groups", "verbose-flag", "duplicate-names", "default-name", "deep-status"],
)
def test_admission_refuses_with_the_field_path(obj: dict[str, Any], path: str) -> None:
    response = admission.review_policy(policy_review(obj))["response"]
    if not path:  # `status` is ignored, so a deep one may pass; it must not crash
        return
    assert response["allowed"] is False
    assert response["status"]["message"].startswith(f"{path}: ")


@pytest.fixture
async def webhook() -> AsyncIterator[aiohttp.test_utils.TestClient[Any, Any]]:
    async def labels(_: str) -> dict[str, str]:
        return {}

    server = aiohttp.test_utils.TestServer(build_app(labels))
    async with aiohttp.test_utils.TestClient(server) as client:
        yield client


@pytest.mark.parametrize("depth", [1_000, 5_000, 100_000])
async def test_webhook_answers_deep_json_with_400_not_500(
    webhook: aiohttp.test_utils.TestClient[Any, Any], depth: int
) -> None:
    body = "[" * depth + "]" * depth
    response = await webhook.post(WEBHOOK_VALIDATE_POLICIES_PATH, data=body)
    assert response.status == 400
    assert "nested too deeply" in (await response.json())["error"]


async def test_webhook_answers_a_deep_review_object_with_400_or_a_refusal(
    webhook: aiohttp.test_utils.TestClient[Any, Any],
) -> None:
    for depth in (100, 400, 800, 990):
        obj = ingress({"http": {"paths": [{"regex": "a{1001}"}]}})
        obj["spec"]["extra"] = nested(depth)
        body = json.dumps(policy_review(obj)) if depth < 400 else _deep_review_text(obj, depth)
        response = await webhook.post(WEBHOOK_VALIDATE_POLICIES_PATH, data=body)
        assert response.status in (200, 400), depth
        if response.status == 200:
            assert (await response.json())["response"]["allowed"] is False


def _deep_review_text(obj: dict[str, Any], depth: int) -> str:
    # json.dumps itself recurses; write the nesting by hand.
    del obj["spec"]["extra"]
    marker = '"__deep__"'
    text = json.dumps(policy_review(obj | {"deep": "__deep__"}))
    return text.replace(marker, '{"a": [' * depth + "1" + "]}" * depth)


# --- the watch loops survive what they meet ------------------------------------------------


def test_agent_loop_logs_counts_and_survives_an_exception(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from steer.source import local as source_module

    def changes(*_: Any, **__: Any) -> Iterator[set[tuple[int, str]]]:
        yield {(1, "a")}
        yield {(1, "b")}

    monkeypatch.setattr(source_module, "watch", changes)
    inputs = LocalInputs(tmp_path, tmp_path / "none.json")
    monkeypatch.setattr(inputs, "affected_by", lambda _: True)
    agent = LocalAgent(inputs, status_file=tmp_path / "status.json", datapath=object())  # type: ignore[arg-type]
    calls: list[int] = []

    def sync() -> Any:
        calls.append(len(calls))
        if len(calls) < 3:
            raise RuntimeError(f"sync {len(calls)} failed")
        return None

    monkeypatch.setattr(agent, "sync", sync)
    monkeypatch.setattr(agent, "_log", lambda report: None)
    # Not the agent's event servers and netfilter readers: they would bind this host's
    # sockets and conntrack, and set its conntrack sysctls.
    monkeypatch.setattr(agent_module, "observing", lambda *_, **__: contextlib.nullcontext())
    agent.run()  # the first sync and the first change raise; the loop goes on
    assert calls == [0, 1, 2]
    assert agent.loop_errors == 2
    assert "sync 1 failed" in caplog.text and "Traceback" in caplog.text


async def test_control_plane_loop_logs_counts_and_survives_an_exception(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from steer.source import local as source_module

    async def changes(*_: Any, **__: Any) -> AsyncIterator[set[tuple[int, str]]]:
        for name in ("a", "b", "c"):
            await asyncio.sleep(0)
            yield {(1, name)}

    monkeypatch.setattr(source_module, "awatch", changes)
    inputs = LocalInputs(tmp_path, tmp_path / "none.json")
    monkeypatch.setattr(inputs, "affected_by", lambda _: True)
    plane = LocalControlPlane(inputs, status_file=tmp_path / "control.json")
    refreshed: list[int] = []

    def refresh() -> bool:
        refreshed.append(1)
        if len(refreshed) == 1:
            raise RuntimeError("render failed")
        return True

    monkeypatch.setattr(plane, "refresh", refresh)
    await plane._watch_inputs()
    assert len(refreshed) == 3
    assert plane.loop_errors == 1
    assert "render failed" in caplog.text and "Traceback" in caplog.text
    plane.write_status()
    status = json.loads((tmp_path / "control.json").read_text())
    assert status["loop_errors"] == 1
