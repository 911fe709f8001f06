"""The benchmark's figures: memory and time of the meta-gradient against the inner steps."""

from __future__ import annotations

import pathlib

from .report import fmt_bytes

__all__ = ["plot"]


def plot(rows, out_dir, limit_bytes: float = 8e9) -> list[pathlib.Path]:
    """One PNG per benchmark: memory (left) and time (right) against steps, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = pathlib.Path(out_dir)
    paths = []
    for bench in dict.fromkeys(r["benchmark"] for r in rows):
        fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
        for i, method in enumerate(dict.fromkeys(r["method"] for r in rows if r["benchmark"] == bench)):
            rs = sorted((r for r in rows if r["benchmark"] == bench and r["method"] == method), key=lambda r: r["steps"])
            color = f"C{i}"
            # MB (1e6 bytes), the unit of the log lines and of bench.md.
            mem = [(r["steps"], r["peak_bytes"] / 1e6, r.get("seconds") is not None) for r in rs if r.get("peak_bytes")]
            if mem:
                ax_m.plot([m[0] for m in mem], [m[1] for m in mem], "-", color=color, label=method)
                ax_m.plot([m[0] for m in mem if m[2]], [m[1] for m in mem if m[2]], "o", color=color)
                ax_m.plot([m[0] for m in mem if not m[2]], [m[1] for m in mem if not m[2]], "o", color=color,
                          markerfacecolor="none")
            tim = [(r["steps"], r["seconds"]) for r in rs if r.get("seconds") is not None]
            if tim:
                ax_t.plot([x[0] for x in tim], [x[1] for x in tim], "o-", color=color, label=method)
        top = max((r["peak_bytes"] for r in rows if r["benchmark"] == bench and r.get("peak_bytes")), default=0)
        if top > limit_bytes / 10:
            ax_m.axhline(limit_bytes / 1e6, color="grey", ls="--", lw=1)
            # x in axes coordinates: data coordinates taken before the log scale is set put the label off the axes
            ax_m.text(0.01, limit_bytes / 1e6, f" run limit {fmt_bytes(limit_bytes)}", va="bottom", fontsize=8,
                      color="grey", transform=ax_m.get_yaxis_transform())
        for ax, ylabel in ((ax_m, "peak memory of the meta-gradient (MB)"), (ax_t, "seconds per meta-gradient")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("inner steps K = T / h  (h = 0.01)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        mb = next(r["meta_batch"] for r in rows if r["benchmark"] == bench)
        untimed = any(r.get("peak_bytes") and r.get("seconds") is None for r in rows if r["benchmark"] == bench)
        ax_m.set_title(f"{bench}: memory (XLA, compiled" + ("; hollow: memory only, not timed)" if untimed else ")"),
                       fontsize=10)
        ax_t.set_title(f"{bench}: time, meta-batch {mb} (median)", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"bench-{bench}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
