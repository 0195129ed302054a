"""JSON Lines, read one way everywhere: records, probes, loss histories."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def read_jsonl(path: Path) -> Iterator[dict]:
    """The records of a ``.jsonl`` file, one per non-blank line, streamed."""
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)
