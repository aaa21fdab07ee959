"""Log lines as JSON objects (`steer --log-format json`), for log pipelines that parse
them: one object per line, with `time` (UTC, RFC 3339), `level`, `logger`, `message`,
and `exception` when there is a traceback. Envoy's lines under `steer envoy` use the same
keys (steer.node.envoy.ENVOY_JSON_LOG_FORMAT)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document)
