"""A parity report as ``parity.json`` (everything), ``parity.md`` (for people) and ``parity.png``
(relative L2 error against σ per call, of D and of the prediction F, and against the step along
the trajectory)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from diffexport.engines.manifest import write_json
from diffexport.fileio import write_atomic
from diffexport.parity.task import markdown_lines as task_markdown_lines

FILES = ("parity.json", "parity.md", "parity.png")


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as the strings ``"inf"`` / ``"nan"`` (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_report(report: dict, out_dir: Path) -> list[Path]:
    """Write the three report files into ``out_dir`` (created if needed), each atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / FILES[0], json_safe(report))
    write_atomic(out_dir / FILES[1], markdown(report).encode())
    write_atomic(out_dir / FILES[2], plot(report))
    return [out_dir / f for f in FILES]


def _g(v: Any) -> str:
    return "-" if v is None else f"{v:.2e}" if isinstance(v, float) else str(v)


def markdown(report: dict) -> str:
    """The report as Markdown: a verdict table, then per backend the σ sweep, the steps and any divergence."""
    s = report["settings"]
    lines = [
        f"# Parity of `{report['engine']}`: {'PASS' if report['passed'] else 'FAIL'}", "",
        f"Against the torch reference (fp32 eager), {report['created']}. Per call: {s['num_sigmas']} log-spaced σ, "
        f"batch {s['batch']}, seed {s['seed']}; errors of the output D and of the network's prediction "
        f"F = (D − c_skip·x)/c_out (at small σ, D ≈ x hides F's error). "
        f"Trajectory: {s['solver']}, {s['num_steps']} steps, same latents and noise.", "",
        "| backend | precision | per-call D rel L2 (worst) | tol | per-call F rel L2 (worst) | tol | final rel L2 | tol | result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, e in report["backends"].items():
        tol = e["tolerances"]
        worst = e.get("per_call_worst", {}).get("rel_l2")
        f_worst = e.get("per_call_f_worst", {}).get("f_rel_l2")
        final = e.get("trajectory", {}).get("final", {}).get("rel_l2")
        verdict = "pass" if e["passed"] else "**FAIL**"
        lines.append(f"| {name} | {e['precision']} | {_g(worst)} | {tol['per_call_rtol']:g} | {_g(f_worst)} | "
                     f"{tol['per_call_f_rtol']:g} | {_g(final)} | {tol['final_rtol']:g} | {verdict} |")
    for name, e in report["backends"].items():
        lines += ["", f"## {name}", ""]
        if e.get("error"):
            lines += [f"Error: `{e['error']}`", ""]
        if e.get("per_call"):
            lines += ["| σ | D max abs | D rel L2 | F max abs | F rel L2 |", "|---|---|---|---|---|"]
            lines += [f"| {r['sigma']:.4g} | {_g(r['max_abs'])} | {_g(r['rel_l2'])} | {_g(r.get('f_max_abs'))} | {_g(r.get('f_rel_l2'))} |"
                      for r in e["per_call"]]
        if e.get("trajectory"):
            lines += ["", "| step | σ after | max abs | rel L2 |", "|---|---|---|---|"]
            lines += [f"| {r['step']} | {r['sigma']:.4g} | {_g(r['max_abs'])} | {_g(r['rel_l2'])} |" for r in e["trajectory"]["steps"]]
        if "divergence" in e:
            d = e["divergence"]
            at = f" (at σ = {d['sigma']:.4g})" if d and d.get("sigma") is not None else ""
            lines += ["", f"Diagnosis{at}: {d['summary']}." if d else
                      "No single ONNX node exceeds the per-call tolerance on the worst inputs: the error builds up gradually."]
    lines += task_markdown_lines(report)  # task-level parity (parity.judge), if any
    return "\n".join(lines) + "\n"


def plot(report: dict) -> bytes:
    """PNG bytes: rel L2 vs σ per call (D solid, F dotted) and vs step (trajectory), one colour per
    backend, tolerances dashed (D, final) and dash-dotted (F)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def finite(v: Any) -> float:
        return v if isinstance(v, float) and math.isfinite(v) and v > 0 else float("nan")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for name, e in report["backends"].items():
        calls = e.get("per_call", [])
        color = ax1.plot([r["sigma"] for r in calls], [finite(r["rel_l2"]) for r in calls],
                         "o-", label=f"{name} ({e['precision']}) D")[0].get_color()
        ax1.plot([r["sigma"] for r in calls], [finite(r.get("f_rel_l2")) for r in calls], "s:", color=color, label=f"{name} F")
        ax1.axhline(e["tolerances"]["per_call_rtol"], ls="--", lw=1, color=color)
        if "per_call_f_rtol" in e["tolerances"]:
            ax1.axhline(e["tolerances"]["per_call_f_rtol"], ls="-.", lw=1, color=color)
        steps = e.get("trajectory", {}).get("steps", [])
        ax2.plot([r["step"] for r in steps], [finite(r["rel_l2"]) for r in steps], "o-", color=color, label=name)
        ax2.axhline(e["tolerances"]["final_rtol"], ls="--", lw=1, color=color)
    ax1.set(xscale="log", yscale="log", xlabel="σ", ylabel="relative L2 error", title="per call vs torch reference")
    ax2.set(yscale="log", xlabel="sampler step", ylabel="relative L2 error", title="trajectory (dashed: final tolerance)")
    ax1.legend(fontsize=8)
    ax1.invert_xaxis()  # sampling goes from large to small σ
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
