"""Pod annotations: valid values take effect; bad ones are reported and left at defaults."""

from __future__ import annotations

import pytest

from steer.constants import (
    ANNOTATION_DATAPLANE,
    ANNOTATION_EXCLUDE_INBOUND_PORTS,
    ANNOTATION_EXCLUDE_OUTBOUND_CIDRS,
    ANNOTATION_EXCLUDE_OUTBOUND_PORTS,
    ANNOTATION_INJECT,
    LABEL_ALLOW_EXCLUSIONS,
    LABEL_ALLOW_OPT_OUT,
)
from steer.model.enforce import resolve
from steer.model.pod import (
    AnnotationError,
    Dataplane,
    OptOutIgnored,
    Pod,
    PodSteering,
    Unsteered,
    parse_steering,
    steering_of,
)

ALLOWED = {LABEL_ALLOW_EXCLUSIONS: "true", LABEL_ALLOW_OPT_OUT: "true"}
MAY_OPT_OUT = {LABEL_ALLOW_OPT_OUT: "true"}
DEFAULTS = PodSteering()


def steering(
    annotations: dict[str, str], namespace_labels: dict[str, str] = ALLOWED
) -> PodSteering:
    """The parsed steering, asserting the annotations were all valid."""
    result, errors = parse_steering(annotations, namespace_labels)
    assert errors == []
    return result


def only_error(
    annotations: dict[str, str], namespace_labels: dict[str, str] = ALLOWED
) -> tuple[PodSteering, AnnotationError]:
    result, [error] = parse_steering(annotations, namespace_labels)
    assert "fix" in error.message
    return result, error


def test_no_annotations_means_defaults() -> None:
    assert steering({}, {}) == DEFAULTS
    assert DEFAULTS.inject
    assert DEFAULTS.dataplane is Dataplane.AUTO


@pytest.mark.parametrize(("value", "inject"), [("enabled", True), ("disabled", False)])
def test_inject_values(value: str, inject: bool) -> None:
    assert steering({ANNOTATION_INJECT: value}).inject is inject
    assert steering({ANNOTATION_INJECT: value}).unsteered == (
        None if inject else Unsteered.OPTED_OUT
    )


@pytest.mark.parametrize("dataplane", list(Dataplane))
def test_dataplane_values(dataplane: Dataplane) -> None:
    assert steering({ANNOTATION_DATAPLANE: dataplane.value}).dataplane is dataplane


@pytest.mark.parametrize(
    ("annotation", "value", "choices"),
    [
        (ANNOTATION_INJECT, "true", "enabled, disabled"),
        (ANNOTATION_INJECT, "Disabled", "enabled, disabled"),
        (ANNOTATION_INJECT, "", "enabled, disabled"),
        (ANNOTATION_DATAPLANE, "bpf", "auto, ebpf, iptables"),
        (ANNOTATION_DATAPLANE, "IPTABLES", "auto, ebpf, iptables"),
    ],
)
def test_invalid_choice_is_reported_and_falls_back_to_default(
    annotation: str, value: str, choices: str
) -> None:
    result, error = only_error({annotation: value})
    assert result == DEFAULTS
    assert (error.annotation, error.value) == (annotation, value)
    assert choices in error.message
    assert annotation in str(error)


def test_each_invalid_annotation_is_reported_and_valid_ones_still_apply() -> None:
    result, errors = parse_steering(
        {
            ANNOTATION_INJECT: "no",
            ANNOTATION_DATAPLANE: "iptables",
            ANNOTATION_EXCLUDE_INBOUND_PORTS: "http",
            ANNOTATION_EXCLUDE_OUTBOUND_PORTS: "5432",
        },
        ALLOWED,
    )
    assert [e.annotation for e in errors] == [ANNOTATION_INJECT, ANNOTATION_EXCLUDE_INBOUND_PORTS]
    assert result == PodSteering(
        dataplane=Dataplane.IPTABLES, exclude_outbound_ports=frozenset({5432})
    )


@pytest.mark.parametrize(
    ("annotation", "field"),
    [
        (ANNOTATION_EXCLUDE_OUTBOUND_PORTS, "exclude_outbound_ports"),
        (ANNOTATION_EXCLUDE_INBOUND_PORTS, "exclude_inbound_ports"),
    ],
)
@pytest.mark.parametrize(
    ("value", "ports"),
    [
        ("8080", {8080}),
        ("8080,9090", {8080, 9090}),
        (" 1 , 65535 ,", {1, 65535}),
        ("80,80", {80}),
        ("", set()),
    ],
)
def test_valid_port_exclusions(annotation: str, field: str, value: str, ports: set[int]) -> None:
    assert getattr(steering({annotation: value}), field) == frozenset(ports)


@pytest.mark.parametrize(
    "annotation", [ANNOTATION_EXCLUDE_OUTBOUND_PORTS, ANNOTATION_EXCLUDE_INBOUND_PORTS]
)
@pytest.mark.parametrize(
    "value",
    ["0", "65536", "-1", "http", "80-90", "8080;9090", "8080,x", "1e3", "0x50"],
)
def test_bad_port_list_is_refused_whole(annotation: str, value: str) -> None:
    result, error = only_error({annotation: value})
    assert result == DEFAULTS
    assert (error.annotation, error.value) == (annotation, value)


def test_unicode_digit_in_port_list_is_reported_not_raised() -> None:
    result, _ = only_error({ANNOTATION_EXCLUDE_INBOUND_PORTS: "80,\u00b2"})
    assert result == DEFAULTS


@pytest.mark.parametrize(
    ("value", "cidrs"),
    [
        ("10.0.0.0/8", ("10.0.0.0/8",)),
        ("10.0.0.0/8, 192.168.1.7/32", ("10.0.0.0/8", "192.168.1.7/32")),
        ("192.168.1.7", ("192.168.1.7/32",)),
    ],
)
def test_valid_cidr_exclusions(value: str, cidrs: tuple[str, ...]) -> None:
    assert steering({ANNOTATION_EXCLUDE_OUTBOUND_CIDRS: value}).exclude_outbound_cidrs == cidrs


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("10.0.0.1/8", "host bits"),
        ("10.0.0.0/33", "not a CIDR"),
        ("10.0.0.0/8,nope", "'nope'"),
        ("fd00::/8", "IPv4 only"),
    ],
)
def test_bad_cidr_list_is_refused_whole(value: str, hint: str) -> None:
    result, error = only_error({ANNOTATION_EXCLUDE_OUTBOUND_CIDRS: value})
    assert result == DEFAULTS
    assert error.annotation == ANNOTATION_EXCLUDE_OUTBOUND_CIDRS
    assert hint in error.message


EXCLUSIONS = {
    ANNOTATION_EXCLUDE_OUTBOUND_PORTS: "5432",
    ANNOTATION_EXCLUDE_INBOUND_PORTS: "9100",
    ANNOTATION_EXCLUDE_OUTBOUND_CIDRS: "10.96.0.0/12",
}


def test_exclusions_apply_where_the_namespace_allows_them() -> None:
    result = steering(EXCLUSIONS, ALLOWED)
    assert result.exclude_outbound_ports == {5432}
    assert result.exclude_inbound_ports == {9100}
    assert result.exclude_outbound_cidrs == ("10.96.0.0/12",)


@pytest.mark.parametrize(
    "namespace_labels",
    [{}, {LABEL_ALLOW_EXCLUSIONS: "false"}, {LABEL_ALLOW_EXCLUSIONS: "True"}, {"other": "true"}],
    ids=["no-label", "false", "wrong-case", "other-label"],
)
@pytest.mark.parametrize("annotation", sorted(EXCLUSIONS))
def test_exclusions_are_ignored_without_namespace_permission(
    namespace_labels: dict[str, str], annotation: str
) -> None:
    annotations = {annotation: EXCLUSIONS[annotation], ANNOTATION_DATAPLANE: "ebpf"}
    result, error = only_error(annotations, namespace_labels)
    assert result == PodSteering(dataplane=Dataplane.EBPF)
    assert LABEL_ALLOW_EXCLUSIONS in error.message


def test_empty_exclusions_need_no_permission() -> None:
    assert steering(dict.fromkeys(EXCLUSIONS, ""), {}) == DEFAULTS


def test_resolve_reports_annotation_errors_as_pod_warnings() -> None:
    pod = Pod("web", "shop", "10.0.0.3", annotations={ANNOTATION_DATAPLANE: "bpf"})
    enforcement = resolve([], [pod])
    [warning] = enforcement.warnings
    assert warning.startswith("pod shop/web: ")
    assert ANNOTATION_DATAPLANE in warning
    assert [m.pod for m in enforcement.pods] == [pod]


@pytest.mark.parametrize(
    "namespace_label, annotation, inject",
    [
        ("disabled", None, False),
        ("disabled", "enabled", True),
        ("enabled", "disabled", False),
        (None, None, True),
    ],
)
def test_namespace_label_sets_the_inject_default_and_the_pod_overrides_it(
    namespace_label: str | None, annotation: str | None, inject: bool
) -> None:
    labels = dict(MAY_OPT_OUT)
    if namespace_label is not None:
        labels[ANNOTATION_INJECT] = namespace_label
    annotations = {} if annotation is None else {ANNOTATION_INJECT: annotation}
    assert steering(annotations, labels).inject is inject


@pytest.mark.parametrize(
    "annotations, pod_labels, namespace_labels, steered",
    [
        ({}, {ANNOTATION_INJECT: "enabled"}, {}, True),
        ({ANNOTATION_INJECT: "disabled"}, {ANNOTATION_INJECT: "enabled"}, MAY_OPT_OUT, False),
        ({}, {ANNOTATION_INJECT: "disabled"}, {ANNOTATION_INJECT: "enabled", **MAY_OPT_OUT}, False),
        ({}, {}, {ANNOTATION_INJECT: "enabled"}, True),
        ({}, {}, {}, False),
    ],
    ids=["pod-label", "annotation-beats-label", "label-beats-namespace", "namespace", "nothing"],
)
def test_cluster_opt_in_precedence(
    annotations: dict[str, str],
    pod_labels: dict[str, str],
    namespace_labels: dict[str, str],
    steered: bool,
) -> None:
    result, _ = parse_steering(annotations, namespace_labels, False, pod_labels)
    assert result.inject is steered


# --- opting out needs the namespace's permission ----------------------------------------------

OPTED_IN_NS = {ANNOTATION_INJECT: "enabled"}


@pytest.mark.parametrize(
    ("annotations", "pod_labels", "source"),
    [
        ({ANNOTATION_INJECT: "disabled"}, {}, "annotation"),
        ({}, {ANNOTATION_INJECT: "disabled"}, "label"),
    ],
    ids=["annotation", "label"],
)
@pytest.mark.parametrize(
    ("namespace_labels", "default"),
    [(OPTED_IN_NS, False), ({}, True), ({LABEL_ALLOW_EXCLUSIONS: "true"}, True)],
    ids=["cluster-namespace-opted-in", "lab", "exclusions-permission-is-not-enough"],
)
def test_a_pods_own_opt_out_is_ignored_without_namespace_permission(
    annotations: dict[str, str],
    pod_labels: dict[str, str],
    source: str,
    namespace_labels: dict[str, str],
    default: bool,
) -> None:
    result, [error] = parse_steering(annotations, namespace_labels, default, pod_labels)
    assert result.inject and result.unsteered is None
    assert isinstance(error, OptOutIgnored) and error.source == source
    assert LABEL_ALLOW_OPT_OUT in error.message and "fix:" in error.message
    assert str(error).startswith(f"{source} {ANNOTATION_INJECT}='disabled': opt-out ignored")


@pytest.mark.parametrize("default", [False, True], ids=["cluster", "lab"])
def test_a_pods_own_opt_out_counts_with_namespace_permission(default: bool) -> None:
    labels = {**OPTED_IN_NS, **MAY_OPT_OUT}
    for pod_annotations, pod_labels in (
        ({ANNOTATION_INJECT: "disabled"}, {}),
        ({}, {ANNOTATION_INJECT: "disabled"}),
    ):
        result, errors = parse_steering(pod_annotations, labels, default, pod_labels)
        assert (result.inject, result.unsteered, errors) == (False, Unsteered.OPTED_OUT, [])


def test_an_ignored_opt_out_falls_through_to_the_pods_label() -> None:
    # The annotation says disabled (ignored), the label says enabled: steered either way.
    result, [error] = parse_steering(
        {ANNOTATION_INJECT: "disabled"}, {}, False, {ANNOTATION_INJECT: "enabled"}
    )
    assert result.inject and isinstance(error, OptOutIgnored)


def test_an_opt_out_that_changes_nothing_is_not_reported() -> None:
    # A cluster namespace that never opted in: the pod is not steered anyway.
    result, errors = parse_steering({ANNOTATION_INJECT: "disabled"}, {}, False)
    assert (result.inject, result.unsteered, errors) == (False, Unsteered.NOT_OPTED_IN, [])


def test_the_namespace_owner_may_opt_the_whole_namespace_out() -> None:
    result, errors = parse_steering({}, {ANNOTATION_INJECT: "disabled"}, True)
    assert (result.inject, result.unsteered, errors) == (False, Unsteered.OPTED_OUT, [])


def test_not_opted_in_is_the_reason_in_a_cluster() -> None:
    result, _ = parse_steering({}, {}, False)
    assert (result.inject, result.unsteered) == (False, Unsteered.NOT_OPTED_IN)


@pytest.mark.parametrize(
    "annotations",
    [{}, {ANNOTATION_INJECT: "enabled"}, {ANNOTATION_INJECT: "disabled"}],
    ids=["nothing", "opted-in", "opted-out"],
)
def test_a_host_network_pod_is_never_steered(annotations: dict[str, str]) -> None:
    pod = Pod(
        "node-exporter",
        "monitoring",
        "172.18.0.3",
        annotations=annotations,
        namespace_labels=OPTED_IN_NS,
        host_network=True,
    )
    result, errors = steering_of(pod)
    assert (result.inject, result.unsteered, errors) == (False, Unsteered.HOST_NETWORK, [])


def test_resolve_steers_a_lab_pod_whose_opt_out_is_not_permitted_and_says_why() -> None:
    pod = Pod("web", "shop", "10.0.0.3", annotations={ANNOTATION_INJECT: "disabled"})
    enforcement = resolve([], [pod])
    assert [m.pod for m in enforcement.pods] == [pod]
    [warning] = enforcement.warnings
    assert warning.startswith(
        "pod shop/web: annotation steer.dev/inject='disabled': opt-out ignored"
    )
    permitted = Pod(
        "web",
        "shop",
        "10.0.0.3",
        annotations={ANNOTATION_INJECT: "disabled"},
        namespace_labels=MAY_OPT_OUT,
    )
    assert resolve([], [permitted]).pods == ()


def test_pods_with_the_same_steering_share_one_object() -> None:
    """A relabelled pod gets its steering parsed again: it must share the one every other
    pod with the same annotations has, not keep a copy of its own."""
    first, _ = parse_steering({"steer.dev/dataplane": "ebpf"}, {})
    second, _ = parse_steering({"steer.dev/dataplane": "ebpf"}, {})
    assert first is second
    assert parse_steering({}, {})[0] is not first
