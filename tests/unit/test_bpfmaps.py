"""One table of BPF build options and map sizes, and the C headers agree with it."""

from __future__ import annotations

import ctypes as ct
import re

from steer.constants import BPF_MAX_SEGMENTS
from steer.node.bpfbuild import BPF_SOURCE_DIR
from steer.node.bpfmaps import BUILD_OPTIONS, MAPS, PolicyVal, cflags, size_mismatches


def test_every_build_option_in_config_h_is_set_from_the_python_table() -> None:
    config = (BPF_SOURCE_DIR / "include/steer/config.h").read_text()
    declared = set(re.findall(r"^#ifndef (STEER_[A-Z_]+)$", config, re.M)) - {"STEER_CONFIG_H"}
    assert declared == set(BUILD_OPTIONS)
    assert sorted(cflags()) == sorted(f"-D{k}={v}" for k, v in BUILD_OPTIONS.items())


def test_every_map_in_maps_h_has_a_layout() -> None:
    maps_h = (BPF_SOURCE_DIR / "include/steer/maps.h").read_text()
    tables = re.findall(r"BPF_TABLE\([^,]+,[^,]+,[^,]+,\s*(steer_[a-z]+)", maps_h)
    others = re.findall(r"BPF_(?!TABLE)[A-Z_]+\((steer_[a-z]+)", maps_h)
    declared = {*tables, *others}
    assert declared == set(MAPS)


def test_the_policy_value_holds_as_many_segments_as_the_programs_walk() -> None:
    assert len(PolicyVal().seg) == BPF_MAX_SEGMENTS == BUILD_OPTIONS["STEER_MAX_SEGMENTS"]


def test_size_mismatches_name_the_map_and_both_sizes() -> None:
    layout = MAPS["steer_policy"]
    ok = (ct.sizeof(layout.key), ct.sizeof(layout.value), layout.max_entries)
    assert size_mismatches("steer_policy", *ok) == []
    assert size_mismatches("steer_policy", ok[0], ok[1] + 4, ok[2]) == [
        f"steer_policy: value size {ok[1] + 4}, expected {ok[1]}"
    ]
