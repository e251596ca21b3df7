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
from typing import Any, Dict, List, Sequence, Tuple

from nvembed.data.spec import DataSpec, FieldsSpec, SourceSpec, write_spec


def per_row_instruction_supported() -> bool:
    return "instruction" in {f.name for f in dataclasses.fields(FieldsSpec)}


def _slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return s[:n].rstrip("_") or "task"


def _write_rows(path: Path, rows: Sequence[Dict[str, Any]], with_instruction: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            out = {"id": r["id"], "query": r["query"], "positive": r["positive"], "negatives": list(r["negatives"])}
            if with_instruction:
                out["instruction"] = r["instruction"]
            f.write(json.dumps(out, ensure_ascii=False) + "\n")


def write_specs(out_dir: str | Path, rows: Sequence[Dict[str, Any]], *, name: str, description: str,
                stages: Sequence[str] = ("stage1", "stage2"), mode: str = "auto",
                default_instruction: str = "Given a query, retrieve relevant documents") -> List[Path]:
    """(Re)write ``out_dir/specs/`` from all ``rows`` (``id, query, positive, negatives, instruction, symmetric``).

    Returns the spec paths (also listed, one per line, in ``specs/datasets.txt``)."""
    spec_dir = Path(out_dir) / "specs"
    if spec_dir.exists():
        shutil.rmtree(spec_dir)
    spec_dir.mkdir(parents=True)
    if mode == "auto":
        mode = "row" if per_row_instruction_supported() else "task"
    if mode not in ("row", "task"):
        raise ValueError(f"mode is {mode!r}; valid: auto, row, task")
    groups: "OrderedDict[Tuple[Any, ...], List[Dict[str, Any]]]" = OrderedDict()
    for r in rows:
        key = (bool(r.get("symmetric")),) if mode == "row" else (bool(r.get("symmetric")), r["instruction"])
        groups.setdefault(key, []).append(r)
    paths: List[Path] = []
    for i, (key, grp) in enumerate(groups.items()):
        sym = key[0]
        if mode == "row":
            stem = f"{name}_symmetric" if sym else name
            instruction = default_instruction
        else:
            stem = f"{name}_{i:04d}_{_slug(key[1])}"
            instruction = key[1]
        data = spec_dir / "files" / f"{stem}.jsonl"
        _write_rows(data, grp, with_instruction=mode == "row")
        fields = FieldsSpec(id="id", query="query", positive="positive", negatives="negatives",
                            instruction="instruction" if mode == "row" else None)
        spec = DataSpec(name=stem, task="retrieval", instruction=instruction,
                        source=SourceSpec(path=f"files/{stem}.jsonl"), fields=fields,
                        weight=float(len(grp)) if mode == "task" else 1.0, stages=list(stages),
                        symmetric=True if sym else None, description=f"{description} ({len(grp)} rows)",
                        provenance={"tool": "nvembed.synth", "rows": len(grp), "spec_mode": mode})
        paths.append(write_spec(spec, spec_dir / f"{stem}.yaml"))
    (spec_dir / "datasets.txt").write_text("".join(f"{p.resolve()}\n" for p in paths), encoding="utf-8")
    return paths
