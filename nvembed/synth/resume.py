"""Append-only JSONL outputs that survive being killed: a restart skips items already done (by a stable id).

A kill can leave a half-written last line; :class:`JsonlLog` drops it (truncating the file back to the last complete
line) before appending, so the next run never glues a new record onto a broken one. A log keeps only the ids it
holds in memory; its records are streamed back from the file (:attr:`JsonlLog.rows`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Optional


def stable_id(*parts: Any) -> str:
    """A short id that depends only on ``parts`` (not on run order, process or Python hash seed)."""
    h = hashlib.sha1(json.dumps(parts, ensure_ascii=False, sort_keys=True, default=str).encode("utf-8"))
    return h.hexdigest()[:16]


def read_jsonl(path: str | Path) -> Iterator[Dict[str, Any]]:
    """Complete, parseable lines of a JSONL file (a broken trailing line from a kill is skipped)."""
    p = Path(path)
    if not p.exists():
        return
    with p.open("r", encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


class JsonlLog:
    """Append-only JSONL file keyed by ``key``; ``done`` holds the keys already written (by this or earlier runs)."""

    def __init__(self, path: str | Path, key: str = "id"):
        self.path, self.key = Path(path), key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()
        self.done = {r[key] for r in read_jsonl(self.path) if key in r}
        self._f = self.path.open("a", encoding="utf-8")

    @property
    def rows(self) -> Iterator[Dict[str, Any]]:
        """Every record written so far, read from the file (appends are flushed)."""
        return read_jsonl(self.path)

    def _repair(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with self.path.open("rb+") as f:
            data = f.read()
            if data.endswith(b"\n"):
                return
            cut = data.rfind(b"\n") + 1  # 0 when the only line is broken
            f.truncate(cut)

    def __contains__(self, k: str) -> bool:
        return k in self.done

    def __len__(self) -> int:
        return len(self.done)

    def append(self, rows: Iterable[Dict[str, Any]]) -> int:
        n = 0
        for r in rows:
            self._f.write(json.dumps(r, ensure_ascii=False) + "\n")
            if self.key in r:
                self.done.add(r[self.key])
            n += 1
        self._f.flush()
        os.fsync(self._f.fileno())
        return n

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "JsonlLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(total: int, desc: str, initial: int = 0, disable: Optional[bool] = None):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=disable, dynamic_ncols=True)
