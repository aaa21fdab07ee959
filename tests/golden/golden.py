"""Golden files: compare a rendering with the committed one; STEER_REGEN_GOLDEN=1 rewrites."""

from __future__ import annotations

import os
from pathlib import Path

DATA = Path(__file__).parent / "data"


def check_golden(name: str, text: str) -> None:
    path = DATA / name
    if os.environ.get("STEER_REGEN_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"{path} missing; run with STEER_REGEN_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs from golden; review, then regenerate"
