"""The benchmark's files: `bench.csv` and the other CSVs, read and written, and their markdown tables."""

from __future__ import annotations

import csv
import io
import math

from .._io import atomic_write_text

__all__ = ["write_csv", "read_csv", "union_keys", "table_markdown", "rows_markdown", "fmt_bytes", "fmt_seconds"]


def fmt_bytes(b) -> str:
    """Bytes as MB (1e6) or GB (1e9); `-` for none."""
    if b is None or (isinstance(b, float) and not math.isfinite(b)):
        return "-"
    return f"{b / 1e6:,.1f} MB" if b < 1e9 else f"{b / 1e9:,.2f} GB"


def fmt_seconds(s) -> str:
    """Seconds as ms below one second; `-` for none."""
    if s is None or (isinstance(s, float) and not math.isfinite(s)):
        return "-"
    return f"{s * 1e3:,.1f} ms" if s < 1 else f"{s:,.2f} s"


def union_keys(rows) -> list:
    """The keys of all `rows`, in order of first appearance."""
    keys = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    return keys


def write_csv(path, rows, columns) -> None:
    """`rows` (dicts) as a CSV of `columns`; `None` as an empty cell.

    Replaced atomically: a sweep killed mid-write leaves the previous file,
    whose rows `run(resume=True)` keeps, never a torn last row.
    """
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    atomic_write_text(path, buf.getvalue())


def read_csv(path) -> list[dict]:
    """Rows of a bench.csv with numbers parsed (empty cells become None)."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            out = {}
            for k, v in r.items():
                if v == "":
                    out[k] = None
                    continue
                try:
                    out[k] = int(v)
                except ValueError:
                    try:
                        out[k] = float(v)
                    except ValueError:
                        out[k] = v
            rows.append(out)
    return rows


def table_markdown(rows, columns=None) -> str:
    """`rows` (dicts) as a markdown table of `columns` (default: all keys)."""
    if not rows:
        return ""
    columns = columns or union_keys(rows)

    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "/")

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def rows_markdown(rows) -> str:
    """bench.csv as a readable markdown table (MB and ms)."""
    cols = ["benchmark", "method", "steps", "T", "peak MB", "temp MB", "seconds", "forward s", "repeats",
            "meta_batch", "checkpoints", "status"]
    out = []
    for r in rows:
        pb, tb = r.get("peak_bytes"), r.get("temp_bytes")
        out.append({
            "benchmark": r["benchmark"], "method": r["method"], "steps": r["steps"], "T": r["T"],
            "peak MB": None if pb is None else round(pb / 1e6, 2), "temp MB": None if tb is None else round(tb / 1e6, 2),
            "seconds": r.get("seconds"), "forward s": r.get("forward_seconds"),
            "repeats": f"{r.get('repeats')}/{r.get('forward_repeats')}", "meta_batch": r["meta_batch"],
            "checkpoints": r.get("checkpoints"), "status": r.get("status"),
        })
    return table_markdown(out, cols)
