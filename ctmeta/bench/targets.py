r"""The benchmark's targets: ratios within one run, each against its goal.

A target compares two rows of `bench.csv` measured alike, e.g. A-MAML's
meta-gradient time over its forward time at $K = 500$ (goal $\le 3$), or
COMLN's compiled memory over ANIL's at $K = 1000$ (goal $\le 0.1$). Each
target is a dict: `name`, `value` (text), `goal`, `met` (`True`, `False`, or
`None` when not measured), `at` (where), and `detail` (every step count).
"""

from __future__ import annotations

import math

from .problems import H, checkpoints_for
from .report import fmt_bytes, fmt_seconds

__all__ = ["evaluate_targets", "targets_markdown", "limit_notes", "print_summary"]


def _get(rows, bench, method, steps, key):
    for r in rows:
        if r["benchmark"] == bench and r["method"] == method and r["steps"] == steps:
            v = r.get(key)
            return None if v is None or v == "" else float(v)
    return None


def _closest(candidates, want):
    candidates = sorted(candidates)
    if not candidates:
        return None
    return min(candidates, key=lambda s: (abs(math.log(s / want)), -s))


def _steps_with(rows, bench, methods, key):
    sets = []
    for m in methods:
        sets.append({r["steps"] for r in rows if r["benchmark"] == bench and r["method"] == m
                     and r.get(key) not in (None, "")})
    return sorted(set.intersection(*sets)) if sets else []


def evaluate_targets(rows, vmap_rows=(), diag_rows=()) -> list[dict]:
    """The six targets of the issue as ratios within this run.

    Each entry: `name`, `value` (text), `goal`, `met` (True/False/None when
    not measured), `at` (where it was measured).
    """
    t = []
    conv = next((b for b in ("omniglot", "miniimagenet") if any(r["benchmark"] == b for r in rows)), None)

    # (1) A-MAML meta-gradient / forward at 500 steps.
    ks = _steps_with(rows, "cosmixture", ["amaml"], "forward_seconds")
    k = _closest(ks, 500)
    if k:
        g, f = _get(rows, "cosmixture", "amaml", k, "seconds"), _get(rows, "cosmixture", "amaml", k, "forward_seconds")
        all_r = ", ".join(f"K={s}: {_get(rows, 'cosmixture', 'amaml', s, 'seconds') / _get(rows, 'cosmixture', 'amaml', s, 'forward_seconds'):.1f}"
                          for s in ks)
        t.append(dict(name="1. A-MAML meta-gradient / its forward (CosMixture)", value=f"{g / f:.2f}",
                      goal="<= 3", met=g / f <= 3, at=f"K={k}", detail=all_r))
    else:
        t.append(dict(name="1. A-MAML meta-gradient / its forward (CosMixture)", value="-", goal="<= 3", met=None, at="not measured"))

    # (2) A-MAML / MAML seconds at equal steps.
    ks = _steps_with(rows, "cosmixture", ["amaml", "maml"], "seconds")
    k = _closest(ks, 500)
    if k:
        ratios = {s: _get(rows, "cosmixture", "amaml", s, "seconds") / _get(rows, "cosmixture", "maml", s, "seconds") for s in ks}
        t.append(dict(name="2. A-MAML seconds / MAML seconds, equal steps (CosMixture)", value=f"{ratios[k]:.2f}",
                      goal="<= 1.5", met=ratios[k] <= 1.5, at=f"K={k}",
                      detail=", ".join(f"K={s}: {v:.2f}" for s, v in ratios.items())))
        if conv:
            kc = _steps_with(rows, conv, ["amaml", "maml"], "seconds")
            if kc:
                t[-1]["detail"] += "; Conv-4 " + ", ".join(
                    f"K={s}: {_get(rows, conv, 'amaml', s, 'seconds') / _get(rows, conv, 'maml', s, 'seconds'):.2f}" for s in kc)
    else:
        t.append(dict(name="2. A-MAML seconds / MAML seconds, equal steps (CosMixture)", value="-", goal="<= 1.5", met=None, at="not measured"))

    # (3) A-MAML / MAML memory at 1000 steps on Conv-4.
    name3 = f"3. A-MAML peak_bytes / MAML peak_bytes ({conv or 'Conv-4'})"
    ks = _steps_with(rows, conv, ["amaml", "maml"], "peak_bytes") if conv else []
    k = _closest(ks, 1000)
    if k:
        a, m = _get(rows, conv, "amaml", k, "peak_bytes"), _get(rows, conv, "maml", k, "peak_bytes")
        t.append(dict(name=name3, value=f"{a / m:.3f} ({fmt_bytes(a)} / {fmt_bytes(m)})", goal="<= 0.25",
                      met=a / m <= 0.25, at=f"K={k}",
                      detail=", ".join(f"K={s}: {_get(rows, conv, 'amaml', s, 'peak_bytes') / _get(rows, conv, 'maml', s, 'peak_bytes'):.3f}" for s in ks)))
    else:
        t.append(dict(name=name3, value="-", goal="<= 0.25", met=None, at="not measured"))

    # (4) COMLN memory flat, COMLN/ANIL memory, Dopri5 vs Euler.
    ks = sorted({r["steps"] for r in rows if r["benchmark"] == conv and r["method"] == "comln" and r.get("peak_bytes")}) if conv else []
    if len(ks) >= 2:
        mem = [_get(rows, conv, "comln", s, "peak_bytes") for s in ks]
        spread = (max(mem) - min(mem)) / min(mem)
        t.append(dict(name="4a. COMLN memory flat in T/h", value=f"{100 * spread:.2f}% spread ({fmt_bytes(min(mem))} - {fmt_bytes(max(mem))})",
                      goal="<= 5%", met=spread <= 0.05, at=f"K={ks[0]}..{ks[-1]}"))
    else:
        t.append(dict(name="4a. COMLN memory flat in T/h", value="-", goal="<= 5%", met=None, at="not measured"))
    ks = _steps_with(rows, conv, ["comln", "anil"], "peak_bytes") if conv else []
    k = _closest(ks, 1000)
    if k:
        c, a = _get(rows, conv, "comln", k, "peak_bytes"), _get(rows, conv, "anil", k, "peak_bytes")
        t.append(dict(name="4b. COMLN peak_bytes / ANIL peak_bytes", value=f"{c / a:.3f} ({fmt_bytes(c)} / {fmt_bytes(a)})",
                      goal="<= 0.1", met=c / a <= 0.1, at=f"K={k}",
                      detail=", ".join(f"K={s}: {_get(rows, conv, 'comln', s, 'peak_bytes') / _get(rows, conv, 'anil', s, 'peak_bytes'):.3f}" for s in ks)))
    else:
        t.append(dict(name="4b. COMLN peak_bytes / ANIL peak_bytes", value="-", goal="<= 0.1", met=None, at="not measured"))
    rn = "miniimagenet-resnet12"
    ks = _steps_with(rows, rn, ["comln", "anil"], "peak_bytes")
    k = _closest(ks, 1000)
    name4d = "4d. COMLN peak_bytes / ANIL peak_bytes, ResNet-12 (d = 16,000)"
    if k:
        c, a = _get(rows, rn, "comln", k, "peak_bytes"), _get(rows, rn, "anil", k, "peak_bytes")
        t.append(dict(name=name4d, value=f"{c / a:.3f} ({fmt_bytes(c)} / {fmt_bytes(a)})", goal="<= 0.1",
                      met=c / a <= 0.1, at=f"K={k}",
                      detail=", ".join(f"K={s}: {_get(rows, rn, 'comln', s, 'peak_bytes') / _get(rows, rn, 'anil', s, 'peak_bytes'):.3f}" for s in ks)))
        head = sorted((d for d in diag_rows if d.get("benchmark") == rn and d.get("method") == "head-only"
                       and d.get("comln_over_anil") is not None), key=lambda d: d["steps"])
        if head:
            t[-1]["detail"] += "; head alone (features fixed): " + ", ".join(
                f"K={d['steps']}: {fmt_bytes(d['comln_head_bytes'])} / {fmt_bytes(d['anil_head_bytes'])} "
                f"= {d['comln_over_anil']:.3f}" for d in head)
    elif any(r["benchmark"] == rn for r in rows):
        t.append(dict(name=name4d, value="-", goal="<= 0.1", met=None, at="not measured"))
    ks = [s for s in (_steps_with(rows, conv, ["comln", "comln-euler"], "seconds") if conv else []) if s * H >= 1]
    if ks:
        ratios = {s: _get(rows, conv, "comln", s, "seconds") / _get(rows, conv, "comln-euler", s, "seconds") for s in ks}
        t.append(dict(name="4c. COMLN Dopri5 seconds / Euler seconds, T >= 1", value=", ".join(f"K={s}: {v:.2f}" for s, v in ratios.items()),
                      goal="< 1 for every T >= 1", met=all(v < 1 for v in ratios.values()), at=f"K={ks[0]}..{ks[-1]}"))
    else:
        t.append(dict(name="4c. COMLN Dopri5 seconds / Euler seconds, T >= 1", value="-", goal="< 1", met=None, at="not measured"))

    # (5) vmap speed-up.
    v = next((r for r in vmap_rows if r["method"] == "amaml-vmap"), None)
    if v:
        t.append(dict(name="5. vmap speed-up over a Python loop (A-MAML, 5 CosMixture tasks)",
                      value=f"{v['speedup']:.2f}x", goal=">= 3", met=v["speedup"] >= 3, at=f"K={v['steps']}"))
    else:
        t.append(dict(name="5. vmap speed-up over a Python loop", value="-", goal=">= 3", met=None, at="not measured"))

    # (6) checkpointed A-MAML.
    for bench in [b for b in ("cosmixture", conv) if b]:
        ks = _steps_with(rows, bench, ["amaml", "amaml-ckpt"], "peak_bytes")
        if not ks:
            continue
        k = ks[-1]
        mr = _get(rows, bench, "amaml-ckpt", k, "peak_bytes") / _get(rows, bench, "amaml", k, "peak_bytes")
        kt = _steps_with(rows, bench, ["amaml", "amaml-ckpt"], "seconds")
        tr = ""
        if kt:
            tr = ", time ratio " + ", ".join(
                f"K={s}: {_get(rows, bench, 'amaml-ckpt', s, 'seconds') / _get(rows, bench, 'amaml', s, 'seconds'):.2f}" for s in kt)
        t.append(dict(name=f"6. amaml-ckpt / amaml peak_bytes ({bench})", value=f"{mr:.3f}", goal="< 1 (time: reported)",
                      met=mr < 1, at=f"K={k}, C={checkpoints_for(k)}",
                      detail="memory " + ", ".join(
                          f"K={s}: {_get(rows, bench, 'amaml-ckpt', s, 'peak_bytes') / _get(rows, bench, 'amaml', s, 'peak_bytes'):.3f}" for s in ks) + tr))

    # (7) the adaptive backward (`Adjoint()`) against its own forward, and its memory against
    # the stored sweep at the paper's h = 0.01, on CosMixture 100-shot at T = 5 (K = 500).
    ks = _steps_with(rows, "cosmixture", ["amaml-adaptive"], "seconds")
    if ks:
        k = _closest(ks, 500)
        sec = _get(rows, "cosmixture", "amaml-adaptive", k, "seconds")
        fwd = _get(rows, "cosmixture", "amaml-adaptive", k, "forward_seconds")
        ratio = sec / fwd if sec and fwd else float("nan")
        t.append(dict(name="7. amaml-adaptive meta-gradient / its forward (cosmixture)", value=f"{ratio:.2f}",
                      goal="<= 3", met=bool(ratio <= 3), at=f"T={k * H:g}",
                      detail=", ".join(
                          f"T={s * H:g}: {_get(rows, 'cosmixture', 'amaml-adaptive', s, 'seconds') / _get(rows, 'cosmixture', 'amaml-adaptive', s, 'forward_seconds'):.2f}"
                          for s in ks)))
    km = _steps_with(rows, "cosmixture", ["amaml", "amaml-adaptive"], "peak_bytes")
    if km:
        k = _closest(km, 500)
        mr = _get(rows, "cosmixture", "amaml-adaptive", k, "peak_bytes") / _get(rows, "cosmixture", "amaml", k, "peak_bytes")
        t.append(dict(name="8. amaml-adaptive / amaml (stored, h = 0.01) peak_bytes (cosmixture)", value=f"{mr:.3f}",
                      goal="<= 1", met=bool(mr <= 1), at=f"T={k * H:g}",
                      detail=", ".join(
                          f"T={s * H:g}: {_get(rows, 'cosmixture', 'amaml-adaptive', s, 'peak_bytes') / _get(rows, 'cosmixture', 'amaml', s, 'peak_bytes'):.3f}"
                          for s in km)))
    return t


def _met(m):
    return "met" if m is True else ("not met" if m is False else "not measured")


def targets_markdown(targets, diag_rows=()) -> str:
    lines = ["| target | value | goal | where | result |", "| --- | --- | --- | --- | --- |"]
    for t in targets:
        lines.append(f"| {t['name']} | {t['value']} | {t['goal']} | {t['at']} | **{_met(t['met'])}** |")
    details = [f"- {t['name']}: {t['detail']}" for t in targets if t.get("detail")]
    text = "\n".join(lines) + "\n"
    if details:
        text += "\nAll step counts:\n\n" + "\n".join(details) + "\n"
    notes = limit_notes(diag_rows)
    if notes:
        text += "\nWhat limits them (measured, diagnostics.csv):\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    return text


def limit_notes(diag_rows) -> list[str]:
    """One line per diagnostic: the measured quantities behind the targets."""
    notes = []
    for d in diag_rows or ():
        if d.get("error"):
            notes.append(f"{d.get('benchmark')} {d.get('method')} K={d.get('steps')}: diagnostic failed: {d['error']}")
        elif d.get("sweep_seconds") is not None:
            k = d["steps"]
            notes.append(
                f"A-MAML, CosMixture K={k}, meta-batch {d['meta_batch']}: Dopri5 took {d['dopri5_steps']} steps "
                f"({d['rejected_steps']} rejected), ~{6 * d['dopri5_steps'] + 1} gradient evaluations; forward to u(T) "
                f"{fmt_seconds(d['fwd_t1_seconds'])}, forward storing {k + 1} states {fmt_seconds(d['fwd_stored_seconds'])}, "
                f"backward Heun sweep ({2 * k} HVPs) {fmt_seconds(d['sweep_seconds'])}; one gradient "
                f"{d['grad_eval_seconds'] * 1e6:.0f} us, one HVP {d['hvp_seconds'] * 1e6:.0f} us "
                f"({d['hvp_per_grad']:.2f} gradients; {d['hvp_u_only_seconds'] * 1e6:.0f} us without the data cotangent); "
                f"(stored forward + sweep) / forward = "
                f"{(d['fwd_stored_seconds'] + d['sweep_seconds']) / d['fwd_t1_seconds']:.1f}.")
        elif d.get("method") == "amaml" and d.get("grad_evals_per_h") is not None:
            note = (f"A-MAML, {d['benchmark']} K={d['steps']} (T={d['T']:g}): Dopri5 {d['dopri5_steps']} steps "
                    f"= {d['grad_evals_per_h']:.2f} gradient evaluations per h = 0.01 (backward: 2 HVPs per h).")
            if d.get("diagnostic") == "stiff":
                note += (f" Stiff: lambda_max {d['lambda_max_u0']:.3g} / {d['lambda_max_mid']:.3g} / "
                         f"{d['lambda_max_uT']:.3g} and lambda_min {d['lambda_min_u0']:.3g} / {d['lambda_min_mid']:.3g} / "
                         f"{d['lambda_min_uT']:.3g} at u0 / u(T/2) / u(T), Dopri5's mean h lambda_max "
                         f"{d['dopri5_h_lambda']:.2f} (stability-bound near 3.3); RKC2 {d['rkc2_steps']} steps of at "
                         f"most {d['rkc2_max_stages']} stages, {d['rkc2_evals']} gradients + {d['rkc2_hvps']} HVPs.")
            notes.append(note)
        elif d.get("head_init"):
            notes.append(f"A-MAML, whole Conv-4 ({d['benchmark']}), {d['head_init']} head: Dopri5 needs "
                         f"~{d['dopri5_steps']} steps to T = {d.get('T', 0.1):g} (last step {d['last_dt']:.2g}; "
                         f"reached t = {d['reached_t']:.3g} in the counted steps).")
        elif d.get("method") == "comln" and d.get("euler_steps") is not None:
            notes.append(f"COMLN, {d['benchmark']} K={d['steps']} (T={d['T']:g}): Dopri5 {d['dopri5_steps']} steps "
                         f"({d['dopri5_evals']} evaluations of the augmented field) vs Euler {d['euler_steps']}.")
        elif d.get("method") == "comln-head-only":
            notes.append(f"COMLN head only (features fixed), K={d['steps']}: Dopri5 {fmt_seconds(d['dopri5_head_seconds'])} "
                         f"vs Euler {fmt_seconds(d['euler_head_seconds'])} (ratio {d['dopri5_over_euler']:.2f}, "
                         f"timed alternately).")
    return notes


def print_summary(targets, console=None):
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    title = "targets of ctmeta bench (ratios within this run)"
    if not console.is_terminal:  # a file or a pipe: plain lines, as `ctmeta train` prints its table
        header = ("target", "value", "goal", "where", "result")
        rows = [header] + [(t["name"], t["value"], t["goal"], t["at"], _met(t["met"])) for t in targets]
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        console.print("\n".join([title, ""] + lines), markup=False, highlight=False, soft_wrap=True)
        return
    table = Table(title=title)
    for col in ("target", "value", "goal", "where", "result"):
        table.add_column(col)
    for t in targets:
        style = "green" if t["met"] is True else ("red" if t["met"] is False else "yellow")
        table.add_row(t["name"], t["value"], t["goal"], t["at"], f"[{style}]{_met(t['met'])}[/]")
    console.print(table)
