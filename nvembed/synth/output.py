"""Write synthetic rows as nvembed data specs (``nvembed/data/spec.py``) + their JSONL files.

Rows carry their own task instruction. The data layer takes one ``instruction`` per spec; when ``FieldsSpec`` has a
per-row ``instruction`` field (``fields.instruction``), one spec per symmetric/asymmetric group is written
(``mode="row"``); otherwise rows are grouped by instruction into one spec each (``mode="task"``), weighted by row
count so the mixture matches one combined dataset. ``mode="auto"`` picks ``row`` when the data layer supports it.
Specs are written with :func:`nvembed.data.spec.write_spec` (validated, and they load back unchanged).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence, Tuple

from nvembed.data.spec import DataSpec, FieldsSpec, SourceSpec, write_spec


def per_row_instruction_supported() -> bool:
    return "instruction" in {f.name for f in dataclasses.fields(FieldsSpec)}


def _slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return s[:n].rstrip("_") or "task"


def _row_line(r: Dict[str, Any], with_instruction: bool) -> str:
    out = {"id": r["id"], "query": r["query"], "positive": r["positive"], "negatives": list(r["negatives"])}
    if with_instruction:
        out["instruction"] = r["instruction"]
    return json.dumps(out, ensure_ascii=False) + "\n"


class _Files:
    """Append handles of the group files, at most ``limit`` open at once (task mode may have many groups)."""

    def __init__(self, limit: int = 64):
        self.limit, self.open = limit, {}

    def write(self, path: Path, line: str) -> None:
        f = self.open.get(path)
        if f is None:
            if len(self.open) >= self.limit:
                self.close()
            path.parent.mkdir(parents=True, exist_ok=True)
            f = self.open[path] = path.open("a", encoding="utf-8")
        f.write(line)

    def close(self) -> None:
        for f in self.open.values():
            f.close()
        self.open = {}


def write_specs(out_dir: str | Path, rows: Iterable[Dict[str, Any]], *, name: str, description: str,
                stages: Sequence[str] = ("stage1", "stage2"), mode: str = "auto",
                default_instruction: str = "Given a query, retrieve relevant documents") -> List[Path]:
    """(Re)write ``out_dir/specs/`` from all ``rows`` (``id, query, positive, negatives, instruction, symmetric``),
    streamed once: each row goes to its group's file as it comes.

    Returns the spec paths (also listed, one per line, in ``specs/datasets.txt``)."""
    spec_dir = Path(out_dir) / "specs"
    if spec_dir.exists():
        shutil.rmtree(spec_dir)
    spec_dir.mkdir(parents=True)
    if mode == "auto":
        mode = "row" if per_row_instruction_supported() else "task"
    if mode not in ("row", "task"):
        raise ValueError(f"mode is {mode!r}; valid: auto, row, task")
    # rows streamed into one file per group (first-seen order), counted; the specs are written after
    groups: "OrderedDict[Tuple[Any, ...], List[Any]]" = OrderedDict()  # key -> [stem, rows]
    files = _Files()
    try:
        for r in rows:
            key = (bool(r.get("symmetric")),) if mode == "row" else (bool(r.get("symmetric")), r["instruction"])
            g = groups.get(key)
            if g is None:
                sym = key[0]
                stem = (f"{name}_symmetric" if sym else name) if mode == "row" else \
                    f"{name}_{len(groups):04d}_{_slug(key[1])}"
                g = groups[key] = [stem, 0]
            files.write(spec_dir / "files" / f"{g[0]}.jsonl", _row_line(r, with_instruction=mode == "row"))
            g[1] += 1
    finally:
        files.close()
    paths: List[Path] = []
    for key, (stem, n) in groups.items():
        sym = key[0]
        instruction = default_instruction if mode == "row" else key[1]
        fields = FieldsSpec(id="id", query="query", positive="positive", negatives="negatives",
                            instruction="instruction" if mode == "row" else None)
        spec = DataSpec(name=stem, task="retrieval", instruction=instruction,
                        source=SourceSpec(path=f"files/{stem}.jsonl"), fields=fields,
                        weight=float(n) if mode == "task" else 1.0, stages=list(stages),
                        symmetric=True if sym else None, description=f"{description} ({n} rows)",
                        provenance={"tool": "nvembed.synth", "rows": n, "spec_mode": mode})
        paths.append(write_spec(spec, spec_dir / f"{stem}.yaml"))
    (spec_dir / "datasets.txt").write_text("".join(f"{p.resolve()}\n" for p in paths), encoding="utf-8")
    return paths
