"""``diffexport build RECIPE`` and ``diffexport inspect ENGINE_DIR``."""

from __future__ import annotations

from pathlib import Path

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from diffexport.cli.app import app, console, fail
from diffexport.deploy.cpp import CppBuildError, cpp_stage
from diffexport.deploy.triton import TritonError, triton_stage
from diffexport.engines import EngineError, build_engine, read_manifest
from diffexport.engines.build import Finalize
from diffexport.engines.manifest import engine_problems, hash_records
from diffexport.export import TargetUnavailable
from diffexport.parity import parity_stage
from diffexport.fileio import unwritable
from diffexport.recipes import Recipe, RecipeError, load_recipe
from diffexport.recipes.schema import Export
from diffexport.runtime.bench import rank_stage

STATUS_STYLE = {"ok": "green", "failed": "red", "unchecked": "yellow"}
KNOWN_ERRORS = (RecipeError, EngineError, TargetUnavailable, TritonError, CppBuildError)  # their messages say it all


def size(n: int) -> str:
    """``n`` bytes in human units (``1.5 MB``)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


class Progress:
    """``build_engine``'s progress callback: a spinner while a stage runs, one line when it ends."""

    def __init__(self) -> None:
        self.stage, self.status = "", None

    def __call__(self, stage: str, event: str, seconds: float, detail: str) -> None:
        self.stop()
        if event == "start":
            self.stage = stage
            self.status = console.status(f"{stage} [dim]{escape(detail)}[/]")
            self.status.start()
        elif event == "done":
            console.print(f"[green]✓[/] {stage:<16} {seconds:7.1f} s  [dim]{escape(detail)}[/]")
        else:
            console.print(f"[yellow]![/] {stage:<16} skipped: {escape(detail)}", soft_wrap=True)

    def stop(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None


def finalize_stages(recipe: Recipe) -> list[tuple[str, Finalize]]:
    """The build stages after export that ``recipe`` asks for, in order: parity (when
    ``parity.enabled``; ``--no-parity`` turns it off), rank (``export.targets: auto``: the fastest
    verified backend becomes the default), deploy.triton, deploy.cpp."""
    stages: list[tuple[str, Finalize]] = []
    if recipe.parity.enabled:
        stages.append(("parity", parity_stage))
    if recipe.export.auto:
        stages.append(("rank", rank_stage))
    if recipe.deploy.triton:
        stages.append(("deploy:triton", triton_stage))
    if recipe.deploy.cpp:
        stages.append(("deploy:cpp", cpp_stage))
    return stages


@app.command()
def build(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see recipes/)."),
    out: Path = typer.Option(None, "--out", "-o", help="Engine directory (default: the recipe's output, else engines/<name>)."),
    targets: str = typer.Option(None, "--targets", help="Comma-separated targets replacing export.targets, e.g. onnx,aoti."),
    force: bool = typer.Option(False, "--force", help="Rebuild even when an identical engine is already there."),
    no_parity: bool = typer.Option(False, "--no-parity", help="Skip the parity stage (the manifest says status: unchecked)."),
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of a failure."),
) -> None:
    """Build RECIPE into an engine directory (atomically) and print its path."""
    progress = Progress()
    try:
        spec = load_recipe(recipe)
        if no_parity:
            spec = spec.model_copy(update={"parity": spec.parity.model_copy(update={"enabled": False})})
        wanted = _targets(targets, spec) if targets is not None else None
        if out is not None and (why := unwritable(out.parent)):
            raise fail(f"--out {out}: {why}")
        result = build_engine(spec, out, wanted, force=force, progress=progress, finalize=finalize_stages(spec))
    except BaseException as e:
        progress.stop()
        if debug or isinstance(e, (SystemExit, typer.Exit)):  # (an Exit: its error line is printed)
            raise
        if isinstance(e, KeyboardInterrupt):
            raise fail("interrupted; the engine directory was left as it was", 130) from None
        raise fail(str(e) if isinstance(e, KNOWN_ERRORS) else _unexpected(e, recipe, progress.stage)) from None
    progress.stop()
    if result.built:  # (a no-op was reported by the progress line)
        summary(result.engine_dir, result.manifest, result.seconds)
        console.print(escape(result.message), soft_wrap=True)
    typer.echo(result.engine_dir)
    if result.manifest.get("status") == "failed":
        raise fail(f"{result.engine_dir}: parity failed; see {result.engine_dir / 'parity.md'}")


def _targets(option: str, spec: Recipe) -> list[str]:
    """``--targets a,b`` as a list, checked as ``export.targets`` is (a ``fail`` naming the option)."""
    wanted = [t.strip() for t in option.split(",") if t.strip()]
    try:
        Export.model_validate({**spec.export.model_dump(), "targets": wanted})
    except ValidationError as e:
        err = e.errors()[0]
        got = f" (got {err['input']!r})" if err["type"] == "literal_error" else ""
        raise fail(f"--targets {option}: {err['msg'].removeprefix('Value error, ')}{got}") from None
    return wanted


def _unexpected(e: BaseException, recipe: Path, stage: str) -> str:
    """One paragraph for an export or compiler failure (the traceback is for ``--debug``)."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{recipe}: stage '{stage}' failed: {type(e).__name__}: {first} (--debug shows the traceback)"


def summary(engine_dir: Path, manifest: dict, seconds: float) -> None:
    """Artifacts with sizes and stage times, after a build of ``seconds`` (wall clock)."""
    table = Table(title=f"{manifest['name']} -> {engine_dir}", title_justify="left", box=None)
    for column in ("artifact", "file", "size", "seconds"):
        table.add_column(column, justify="right" if column in ("size", "seconds") else "left")
    stages = manifest.get("stages", {})
    table.add_row("weights", manifest["weights"]["file"], size((engine_dir / manifest["weights"]["file"]).stat().st_size), f"{stages.get('load', 0):.1f}")
    for target, art in manifest["artifacts"].items():
        table.add_row(target, ", ".join(art.get("files", [art["file"]])), size(art["bytes"]), f"{stages.get('export:' + target, 0):.1f}")
    for target, why in manifest.get("skipped", {}).items():
        table.add_row(target, f"[yellow]skipped[/]: {escape(why)}", "", "")
    console.print(table)
    status = manifest.get("status", "?")
    console.print(f"status [{STATUS_STYLE.get(status, 'white')}]{status}[/], {seconds:.1f} s in all")


@app.command()
def inspect(engine_dir: Path = typer.Argument(..., help="Engine directory made by `diffexport build`.")) -> None:
    """Print ENGINE_DIR's manifest in human form and verify every hashed file; exit 1 when one is wrong."""
    try:
        m = read_manifest(engine_dir)
        problems = engine_problems(engine_dir, m)
    except EngineError as e:
        raise fail(str(e)) from None
    try:
        _show(engine_dir, m)
    except (TypeError, KeyError, AttributeError, ValueError, IndexError) as e:  # informational fields not checked by read_manifest
        raise fail(f"{Path(engine_dir) / 'manifest.json'}: a field shown by inspect is malformed ({type(e).__name__}: {e}); "
                   "the manifest is damaged or edited, rebuild the engine") from None
    if problems:
        for line in problems[1:]:
            console.print(f"[red]✗[/] {escape(line)}", soft_wrap=True)
        raise fail(f"{len(problems)} problem(s): {problems[0]}")
    console.print(f"[green]✓[/] {len(hash_records(m))} hashed file record(s) verified", soft_wrap=True)


def _show(engine_dir: Path, m: dict) -> None:
    """The manifest in human form (stdout)."""
    out = Console(highlight=False, soft_wrap=True)
    status = m.get("status", "?")
    out.print(f"[bold]{m['name']}[/]  status [{STATUS_STYLE.get(status, 'white')}]{status}[/]  built {m.get('created', '?')}  ({m['format']})")
    out.print(f"[dim]{Path(engine_dir).resolve()}  content key {str(m.get('content_key', '?'))[:16]}[/]")

    io = m["io"]
    table = Table(title=f"I/O (batch {io['batch'].get('min')}..{io['batch'].get('max')}, opt {io['batch'].get('opt')})", title_justify="left")
    for column in ("", "name", "kind", "dtype", "shape"):
        table.add_column(column)
    for direction, specs in (("in", io["inputs"]), ("out", io["outputs"])):
        for s in specs:
            kind = s["kind"] + (f" in [0, {s['high']})" if "high" in s else "")
            table.add_row(direction, s["name"], escape(kind), s["dtype"], "[" + ", ".join("B" if d == -1 else str(d) for d in s["shape"]) + "]")
    out.print(table)

    s = m["sampler"]
    args = escape(", ".join(f"{k}={v}" for k, v in (s["scheduler"].get("args") or {}).items()))
    nonzero = [x for x in s["sigmas"] if x > 0]
    out.print(f"[bold]sampler[/] {s['scheduler'].get('class')}({args}), {s['solver']} x {s.get('num_steps')} steps"
              f"{' ' + escape(str(s['solver_options'])) if s.get('solver_options') else ''}, sigma {max(nonzero, default=0):g} -> {min(nonzero, default=0):g} -> 0")
    extras = {"guidance": s.get("guidance"), "clip": s.get("clip"), "patching": s.get("patching")}
    for key, value in extras.items():  # what else shapes the samples: CFG weight, clamp range, patches
        if value:
            out.print(f"  {key} {escape(str(value))}")

    table = Table(title="artifacts", title_justify="left")
    for column in ("target", "file", "size", "sha256", "details"):
        table.add_column(column, justify="right" if column == "size" else "left", overflow="fold")
    w = m["weights"]
    w_path = Path(engine_dir) / str(w.get("file"))
    table.add_row("weights", escape(str(w.get("file"))), size(w_path.stat().st_size) if w_path.is_file() else "[red]missing[/]", str(w.get("sha256"))[:12], "")
    skip = {"file", "files", "sha256", "bytes"}
    for target, art in m["artifacts"].items():
        details = ", ".join(f"{k}={v}" for k, v in art.items() if k not in skip and not isinstance(v, dict))
        table.add_row(target, escape(", ".join(map(str, art.get("files") or [art.get("file")]))), size(int(art.get("bytes") or 0)),
                      str(art.get("sha256"))[:12], escape(details))
    for target, why in m.get("skipped", {}).items():
        table.add_row(target, "[yellow]skipped[/]", "", "", escape(why))
    out.print(table)

    out.print("[bold]versions[/] " + escape(", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items() if v)))
    d = m.get("device") or {}
    out.print(f"[bold]device[/] {d.get('type')}: {escape(str(d.get('name')))}" + (f" (compute capability {d['compute_capability']})" if d.get("compute_capability") else ""))
    out.print("[bold]stages[/] " + ", ".join(f"{k} {v:.1f} s" for k, v in m.get("stages", {}).items()))
    if m.get("parity"):
        parity(out, m["parity"])
    if m.get("ranking"):
        ranking(out, m["ranking"], m.get("default_backend"))


def ranking(out: Console, r: dict, default: str | None) -> None:
    """The ``targets: auto`` ranking: per-call ms of each verified candidate at each batch, fastest first."""
    table = Table(title=f"ranking (per-call median of {r.get('repeats', '?')}, load average {r.get('load_average', '?')}; "
                        f"default backend: {default or 'none'})", title_justify="left")
    batches = [str(b) for b in r.get("batches", [])]
    for column in ("#", "backend", "precision", *(f"ms @ batch {b}" for b in batches), "score"):
        table.add_column(column, justify="left" if column in ("backend", "precision") else "right", no_wrap=column == "backend")
    for i, name in enumerate(r.get("order", []), 1):
        c = r["candidates"][name]
        table.add_row(str(i), name + (" (default)" if name == default else ""), c["precision"],
                      *(f"{c['call_ms'][b]:.2f}" for b in batches), f"{c['score']:.2f}x")
    for name in r.get("failed", []):
        table.add_row("-", f"[red]{name}[/]", "", *("" for _ in batches), "[red]failed parity[/]")
    out.print(table)
    if r.get("warning"):
        out.print(f"[yellow]ranking warning[/]: {r['warning']}", soft_wrap=True)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.2e}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return str(value)


LINES = {"task": "task parity"}  # summary fields too long for a table cell: one line per backend below the table


def parity(out: Console, summary: dict) -> None:
    """The manifest's parity summary: scalars on one line, ``{name: {metric: value}}`` as a table."""
    tables = {k: v for k, v in summary.items() if isinstance(v, dict) and v and all(isinstance(r, dict) for r in v.values())}
    out.print("[bold]parity[/] " + escape(", ".join(f"{k} {_fmt(v)}" for k, v in summary.items() if k not in tables)))
    for key, rows in tables.items():
        columns = list(dict.fromkeys(c for row in rows.values() for c in row if c not in LINES))
        table = Table(title=f"parity: {key}", title_justify="left")
        for column in ("", *columns):
            table.add_column(column, overflow="fold")
        for name, row in rows.items():
            table.add_row(name, *(escape(_fmt(row[c])) if c in row else "" for c in columns))
        out.print(table)
        for name, row in rows.items():
            for c in LINES:
                if c in row:
                    out.print(f"{name}: {LINES[c]}: {_fmt(row[c])}", soft_wrap=True, markup=False)
