"""`steer --log-format json`: one JSON object per line, for every process; Envoy's lines
under `steer envoy` carry the same keys."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from steer.logformat import JsonFormatter
from steer.node.envoy import ENVOY_JSON_LOG_FORMAT, envoy_argv


def test_a_record_is_one_json_object_with_the_documented_keys() -> None:
    try:
        raise ValueError('bad "input"\nsecond line')
    except ValueError:
        record = logging.LogRecord(
            "steer.agent", logging.ERROR, __file__, 1, "sync failed: %s", ("x",), sys.exc_info()
        )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    document = json.loads(line)
    assert document["level"] == "error"
    assert document["logger"] == "steer.agent"
    assert document["message"] == "sync failed: x"
    assert "ValueError" in document["exception"]
    assert document["time"].endswith("+00:00")


def test_the_cli_logs_json_when_asked() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "steer.cli", "--log-format", "json", "-v", "render", "crd"],
        capture_output=True,
        text=True,
        check=True,
    )
    for line in filter(None, done.stderr.splitlines()):
        assert set(json.loads(line)) >= {"time", "level", "logger", "message"}


def test_envoy_logs_json_to_stderr_in_a_cluster() -> None:
    argv = envoy_argv(Path("/tmp/bootstrap.json"), None, json_logs=True)
    assert "--log-path" not in argv
    assert argv[argv.index("--log-format") + 1] == ENVOY_JSON_LOG_FORMAT
    # The pattern itself, with a message filled in, is a JSON object with steer's keys.
    sample = (
        ENVOY_JSON_LOG_FORMAT.replace("%Y-%m-%dT%T.%eZ", "2026-12-04T10:00:00.000Z")
        .replace("%l", "warning")
        .replace("%n", "config")
        .replace("%j", json.dumps('a "quoted" message')[1:-1])
    )
    assert set(json.loads(sample)) == {"time", "level", "logger", "message"}
