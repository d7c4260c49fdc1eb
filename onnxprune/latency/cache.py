"""On-disk cache of measured layer latencies, one JSON file per target fingerprint."""

from __future__ import annotations

import json
import os
from pathlib import Path

from onnxprune.atomic_write import atomic_write_text
from onnxprune.latency.target import Target


def cache_dir() -> Path:
    """``$ONNXPRUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/onnxprune``, else ``~/.cache/onnxprune``."""
    explicit = os.environ.get("ONNXPRUNE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "onnxprune"


class LatencyCache:
    """Measured layer latencies: key -> {"us": microseconds, "layout": "nchwc"|"plain"}, plus constants."""

    def __init__(self, target: Target, path: Path | None = None) -> None:
        self.target = target
        self.path = path or cache_dir() / f"latency-{target.cache_id}.json"
        self.entries: dict[str, dict] = {}
        self.constants: dict[str, float] = {}
        self.dirty = False
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                if data.get("fingerprint") == target.fingerprint:
                    self.entries = data.get("entries", {})
                    self.constants = data.get("constants", {})
            except (OSError, ValueError):
                pass  # a damaged cache is re-measured, never trusted

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, value: dict) -> None:
        self.entries[key] = value
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"fingerprint": self.target.fingerprint, "constants": self.constants, "entries": self.entries}
        atomic_write_text(self.path, json.dumps(data, indent=0, sort_keys=True) + "\n")
        self.dirty = False
