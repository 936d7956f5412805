"""``diffexport sample | parity | bench ENGINE_DIR``: run, check and time an engine."""

from __future__ import annotations

import io
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import torch
import typer
from rich.table import Table

from diffexport.cli.app import app, console, fail
from diffexport.engines.base import EngineError
from diffexport.engines.load import BACKENDS, check_device, default_backend, load
from diffexport.engines.verdict import ALLOW_FLAG
from diffexport.engines.manifest import read_manifest
from diffexport.parity.harness import default_cache_dir, run_parity, task_line
from diffexport.recipes.schema import MAX_STEPS
from diffexport.runtime.bench import bench_engine
from diffexport.runtime.guards import SamplingError
from diffexport.fileio import unwritable, write_atomic
from diffexport.runtime.images import save_png_grid
from diffexport.runtime.inputs import condition_specs
from diffexport.runtime.sampler import one_hot_condition, sample as run_sampler

ENGINE_DIR = typer.Argument(..., help="Engine directory made by `diffexport build`.")
BACKEND_HELP = f"Backend: {', '.join(BACKENDS)}."


MAX_SAMPLE_BYTES = 2 << 30  # float32 state of one `sample` run (the solvers hold a few copies of it)
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's range
ALLOW_HELP = "Use an engine whose parity verdict is not ok (failed or unchecked), for debugging."


def _load_npy(path: Path, what: str, integer_ok: bool = False) -> np.ndarray:
    """A finite, non-empty, real .npy array in native byte order (floats; integers when ``integer_ok``);
    a ``fail`` naming ``path`` and what is wrong otherwise. Big-endian files are byte-swapped, never cast."""
    if path.is_dir():
        raise fail(f"{path}: {what} must be a .npy file, got a folder")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)  # mapped: a huge array is refused before it is read
    except FileNotFoundError:
        raise fail(f"{path}: {what} file not found") from None
    except (OSError, ValueError, EOFError) as e:
        raise fail(f"{path}: cannot read {what} as a .npy array ({e})") from None
    allowed = "float16/32/64" + (" or integer" if integer_ok else "")
    if not isinstance(array, np.ndarray) or not (np.issubdtype(array.dtype, np.floating) or (integer_ok and np.issubdtype(array.dtype, np.integer))):
        raise fail(f"{path}: {what} must be one real {allowed} array, got {getattr(array, 'dtype', type(array).__name__)}")
    if array.size == 0:
        raise fail(f"{path}: {what} is empty (shape {list(array.shape)})")
    if array.size * 4 > MAX_SAMPLE_BYTES:
        raise fail(f"{path}: {what} has {array.size} values ({array.size * 4 / 1e9:.1f} GB as float32), over the "
                   f"limit of {MAX_SAMPLE_BYTES / 1e9:.1f} GB per run")
    array = np.array(array, dtype=array.dtype.newbyteorder("="))  # read, in native byte order
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise fail(f"{path}: {what} holds {int((~np.isfinite(array)).sum())} NaN/Inf values")
    return array


def _check_inline_count(option: str, values: str, batch: int | None, batch_from: str) -> None:
    """``fail`` when the comma-separated ``values`` of ``option`` outnumber ``batch`` (fewer are cycled
    over it; more would be cut silently). ``batch_from`` says where the batch comes from."""
    count = values.count(",") + 1
    if batch is not None and count > batch:
        raise fail(f"{option}: {count} values for a batch of {batch} ({batch_from}); give at most {batch} "
                   f"(fewer are cycled over the batch)")


def _parse_conditions(items: list[str], engine=None, batch: int | None = None, batch_from: str = "--batch",
                      options: dict[str, str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``NAME=FILE.npy`` items -> tensors and file names by condition name; ``NAME=3`` / ``NAME=0,1,2``
    (no such file) is the values of that index condition, or one-hot class labels of that vector
    condition, cycled over ``batch`` (more values than ``batch`` are refused, naming the option:
    ``options[NAME]``, else ``--condition NAME``, and ``batch_from``)."""
    tensors, files = {}, {}
    kinds = {c.name: c.kind for c in condition_specs(engine)} if engine is not None else {}
    for item in items:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise fail(f"--condition expects NAME=FILE.npy or NAME=LABEL[,LABEL...], got {item!r}")
        if name in tensors:
            raise fail(f"--condition {name}: given twice; give each condition once")
        if kinds.get(name) == "index" and re.fullmatch(r"-?\d+(,-?\d+)*", file) and not Path(file).exists():
            _check_inline_count((options or {}).get(name, f"--condition {name}"), file, batch, batch_from)
            values = [int(v) for v in file.split(",")]  # range-checked with the engine's io by the sampler
            if any(abs(v) >= 2**63 for v in values):
                raise fail(f"--condition {item}: an index condition's values are int64")
            tensors[name], files[name] = torch.tensor([values[i % len(values)] for i in range(batch or len(values))]), f"--condition {item}"
            continue
        if engine is not None and re.fullmatch(r"\d+(,\d+)*", file) and not Path(file).exists():
            _check_inline_count((options or {}).get(name, f"--condition {name}"), file, batch, batch_from)
            try:
                tensors[name] = one_hot_condition(engine, [int(v) for v in file.split(",")], batch, name)[1]
            except ValueError as e:
                raise fail(f"--condition {item}: {e}") from None
            files[name] = f"--condition {item}"
            continue
        array = _load_npy(Path(file), f"condition '{name}'", integer_ok=True)
        vector = kinds.get(name) == "vector"
        if vector and array.ndim == 1 and np.issubdtype(array.dtype, np.integer):  # class indices
            if batch is not None and len(array) > batch:  # fewer are cycled; more would be dropped (as a one-hot file is refused)
                raise fail(f"{file}: condition '{name}' (class indices) must have at most {batch} rows, the batch "
                           f"(fewer are cycled over it), got {len(array)}")
            try:
                tensors[name], files[name] = one_hot_condition(engine, array.tolist(), batch, name)[1], file
            except ValueError as e:
                raise fail(f"{file}: {e}") from None
            continue
        tensors[name], files[name] = torch.from_numpy(array), file
    return tensors, files


def _save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buf.getvalue())


def _default_backend(manifest: dict, engine_dir: Path) -> str:
    backend = default_backend(manifest)  # the ranking's winner of a ``targets: auto`` build, else the first built
    if backend is None:
        raise fail(f"{engine_dir}: no artifact was built; use --backend torch for the eager reference")
    return backend


def _outputs(out: Path, channels: int, overwrite: bool) -> list[Path]:
    """The files ``sample`` writes for ``out`` (the .npy, and the .png grid for 1 or 3 channels),
    checked before any work: ``out`` ends in .npy, and nothing there is replaced without ``overwrite``."""
    if out.suffix != ".npy":
        raise fail(f"--out {out}: must name a .npy file (the PNG grid is written beside it)")
    paths = [out] + ([out.with_suffix(".png")] if channels in (1, 3) else [])
    for path in paths:
        if path.is_dir() or path.is_symlink():
            raise fail(f"--out {out}: {path} is a {'folder' if path.is_dir() else 'symlink'}; refusing to replace it")
        if path.exists() and not overwrite:
            raise fail(f"--out {out}: {path} already exists; pass --overwrite to replace it, or choose another --out")
    return paths


def _check_batch(batch: int | None, image: tuple[int, int, int]) -> None:
    """``fail`` when ``batch`` samples of ``image`` (C, H, W) exceed :data:`MAX_SAMPLE_BYTES`."""
    per_sample = 4 * image[0] * image[1] * image[2]
    if batch is not None and batch * per_sample > MAX_SAMPLE_BYTES:
        raise fail(f"--batch {batch}: {batch} samples of {list(image)} float32 need {batch * per_sample / 1e9:.1f} GB, over the "
                   f"limit of {MAX_SAMPLE_BYTES / 1e9:.1f} GB per run (at most {MAX_SAMPLE_BYTES // per_sample}); sample in several runs")


@app.command()
def sample(
    engine_dir: Path = ENGINE_DIR,
    out: Path = typer.Option(..., "--out", "-o", help="Output .npy: float32 samples [N, C, H, W] (+ a .png grid for 1 or 3 channels)."),
    backend: str = typer.Option(None, "--backend", "-b", help=BACKEND_HELP + " Default: the engine's default backend (fastest verified of a targets: auto build), else the first built."),
    batch: int = typer.Option(None, "--batch", "-n", min=1, help="Number of samples (default 1, or that of --latents)."),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED, help="Seed of the initial noise and of the per-step noise."),
    latents: Path = typer.Option(None, "--latents", help="Initial state [N, C, H, W] .npy at the first time step: unit noise times alphas[0]*sigmas[0] of the manifest "
                                                   "(sigma_max for EDM/VE, about 1 for VP and DDPM)."),
    condition: list[str] = typer.Option([], "--condition", "-c", help="NAME=FILE.npy for each condition input (repeatable); "
                                        "NAME=3 or NAME=0,1,2: an index condition's values, or a vector condition's one-hot class labels, cycled over --batch (at most --batch values)."),
    label: str = typer.Option(None, "--label", help="Class label(s) for the engine's vector condition, e.g. 3 or 0,1,...,9 (one-hot, cycled over --batch; at most --batch labels)."),
    steps: int = typer.Option(None, "--steps", min=1, max=MAX_STEPS, help="Number of sampler steps (default: the recipe's)."),
    device: str = typer.Option(None, "--device", help="torch device to run on: cpu, cuda, cuda:N (default: where the artifact runs)."),
    cuda_graph: bool = typer.Option(False, "--cuda-graph", help="Replay engine calls from CUDA graphs (CUDA engines)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files (.npy, .png)."),
    allow_unverified: bool = typer.Option(False, ALLOW_FLAG, help=ALLOW_HELP),
) -> None:
    """Sample from ENGINE_DIR with the sampler of its recipe; write the samples to --out."""
    try:
        manifest = read_manifest(engine_dir)
        backend = backend or _default_backend(manifest, engine_dir)
        image = tuple(manifest["io"]["inputs"][0]["shape"][1:])
        if (manifest["sampler"].get("patching") or {}).get("img_shape"):
            image = (image[0], *manifest["sampler"]["patching"]["img_shape"])
        written = _outputs(out, image[0], overwrite)
        _check_batch(batch, image)
        engine = load(engine_dir, backend, device=device, allow_unverified=allow_unverified)
    except EngineError as e:
        raise fail(str(e)) from None
    x_n = torch.from_numpy(_load_npy(latents, "latents")).float() if latents is not None else None
    options = {}  # condition name -> the option that gave it inline (--label)
    if label is not None:
        if not re.fullmatch(r"\d+(,\d+)*", label):
            raise fail(f"--label expects an integer or a comma-separated list of them, got {label!r}")
        try:
            name = one_hot_condition(engine, [0])[0]
            if any(c.partition("=")[0] == name for c in condition):
                raise fail(f"--label: condition '{name}' is also given with --condition; give it once")
            condition, options[name] = [*condition, f"{name}={label}"], "--label"
        except ValueError as e:
            raise fail(f"--label: {e}") from None
    rows = batch or (len(x_n) if x_n is not None and x_n.ndim else None)
    batch_from = f"--batch {batch}" if batch else f"the rows of --latents {latents}"
    conditions, files = _parse_conditions(condition, engine, rows, batch_from, options)
    if x_n is not None and (x_n.ndim != 4 or tuple(x_n.shape[1:]) != image):
        raise fail(f"{latents}: latents must be [N, {', '.join(map(str, image))}], got shape {list(x_n.shape)}")
    start = time.perf_counter()
    try:
        x = run_sampler(engine, manifest["sampler"], batch=batch, seed=seed, latents=x_n, conditions=conditions,
                        num_steps=steps, cuda_graph=cuda_graph, condition_sources=files)
    except (SamplingError, EngineError) as e:
        raise fail(str(e)) from None
    except ValueError as e:
        raise fail(f"{latents}: {e}" if str(e).startswith("latents") else str(e)) from None
    seconds = time.perf_counter() - start
    samples = x.float().cpu().numpy()
    _save_npy(out, samples)
    if len(written) > 1:
        save_png_grid(samples, written[1])
    console.print(f"{samples.shape[0]} sample(s) {list(samples.shape[1:])} with {backend} in {seconds:.2f} s -> "
                  + ", ".join(map(str, written)), soft_wrap=True)


@app.command()
def parity(
    engine_dir: Path = ENGINE_DIR,
    backend: list[str] = typer.Option([], "--backend", "-b", help=BACKEND_HELP + " Repeatable; default: every built artifact."),
    report: Path = typer.Option(None, "--report", help="Folder to write parity.json/.md/.png into (outside the engine directory). "
                                "Default: none (the table is printed); with --mark the engine's own report is rewritten too."),
    per_call_rtol: float = typer.Option(None, help="Override the per-call relative L2 tolerance."),
    final_rtol: float = typer.Option(None, help="Override the final-sample relative L2 tolerance."),
    device: str = typer.Option(None, "--device", help="torch device to run on (default: where each artifact runs)."),
    mark: bool = typer.Option(False, "--mark", help="Record the result (status ok | failed, summary) in the manifest and the "
                              "engine's parity.json/.md/.png: how a --no-parity build is verified."),
) -> None:
    """Check ENGINE_DIR's backends against the torch reference; exit 1 when any check fails.

    Without --mark the engine directory is left as it was (only the reference cache ENGINE_DIR/.cache/parity
    is written, when it can be). Checking an unchecked or failed engine is always allowed (that is what verifies it)."""
    try:
        check_device(device)
        _check_parity_options(engine_dir, backend, {"--per-call-rtol": per_call_rtol, "--final-rtol": final_rtol})
        _check_parity_outputs(engine_dir, report, mark)
        if why := unwritable(cache := default_cache_dir(engine_dir)):
            console.print(f"note: {cache}: {why}; the torch reference is computed, not cached", soft_wrap=True, markup=False)
        result = run_parity(engine_dir, backend or None, report, update_manifest=mark, per_call_rtol=per_call_rtol,
                            final_rtol=final_rtol, device=device)
    except EngineError as e:
        raise fail(str(e)) from None
    table = Table(title=f"parity of {result['engine']} against the torch reference", title_justify="left")
    for column in ("backend", "precision", "per-call rel L2", "tol", "final rel L2", "tol", "result"):
        table.add_column(column, justify="right" if "L2" in column or column == "tol" else "left")
    for name, e in result["backends"].items():
        tol = e["tolerances"]
        worst = e.get("per_call_worst", {}).get("rel_l2")
        final = e.get("trajectory", {}).get("final", {}).get("rel_l2")
        table.add_row(name, e["precision"], _g(worst), f"{tol['per_call_rtol']:g}", _g(final), f"{tol['final_rtol']:g}",
                      "[green]pass[/]" if e["passed"] else "[red]FAIL[/]")
    console.print(table)
    for name, e in result["backends"].items():
        if e.get("task"):  # the recipe's parity.judge: what the samples depict
            console.print(f"{name}: task parity ({result['task']['judge']} judge): {task_line(e['task'])}", soft_wrap=True, markup=False)
        if e.get("error"):
            console.print(f"[red]{name}[/]: {e['error']}", soft_wrap=True)
        if e.get("divergence"):
            console.print(f"[red]{name}[/]: {e['divergence']['summary']}", soft_wrap=True)
    written = [str(Path(f) / "parity.md") for f in dict.fromkeys([*([report] if report else []), *([engine_dir] if mark else [])])]
    console.print(f"report: {', '.join(written)}" if written else "report: not written (--report DIR writes parity.json/.md/.png)",
                  soft_wrap=True, markup=False)
    if not result["passed"]:
        raise typer.Exit(1)


def _check_parity_options(engine_dir: Path, backends: list[str], tolerances: dict[str, float | None]) -> None:
    """Refuse, before any work, a backend that is unknown, not built or the reference itself, and a
    tolerance that is not a finite number > 0 (each named by its option)."""
    for flag, value in tolerances.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            raise EngineError(f"{flag}: must be a finite number > 0, got {value}")
    built = read_manifest(engine_dir).get("artifacts", {})
    for name in backends:
        if name == "torch":
            raise EngineError("--backend torch: the torch reference is what the backends are checked against; name an engine backend")
        if name not in BACKENDS:
            raise EngineError(f"--backend {name}: unknown backend; expected one of {', '.join(b for b in BACKENDS if b != 'torch')}")
        if BACKENDS[name] not in built:
            raise EngineError(f"--backend {name}: no '{BACKENDS[name]}' artifact in this engine (built: {', '.join(built) or 'none'})")


def _check_parity_outputs(engine_dir: Path, report: Path | None, mark: bool) -> None:
    """Refuse, before any work, a --report folder inside the engine directory (unless it is the engine
    directory itself with --mark) and a folder that cannot be written: --report's, and the engine
    directory with --mark (its manifest and report are rewritten)."""
    engine, folder = engine_dir.resolve(), report.resolve() if report else None
    if folder is not None and (folder == engine and not mark or engine in folder.parents):
        raise EngineError(f"--report {report}: is inside the engine directory {engine_dir}; write the report elsewhere "
                          "(the engine's own report is rewritten only with --mark)")
    if folder is not None and (why := unwritable(report)):
        raise EngineError(f"--report {report}: {why}")
    if mark and (why := unwritable(engine_dir)):
        raise EngineError(f"--mark: the engine directory {engine_dir} cannot be updated: {why}")


def _g(v: float | None) -> str:
    return "-" if v is None else f"{v:.2e}"


@app.command()
def bench(
    engine_dir: Path = ENGINE_DIR,
    backend: list[str] = typer.Option([], "--backend", "-b", help=BACKEND_HELP + " Repeatable; default: every built artifact that passed parity (all with --allow-unverified). torch always runs."),
    batch: list[int] = typer.Option([], "--batch", "-n", help="Batch sizes (repeatable; default: 1 and 8, clamped to the engine's range)."),
    json_out: Path = typer.Option(None, "--json", help="Also write the results as JSON."),
    repeats: int = typer.Option(10, min=1, help="Timed calls per backend and batch, in turns of 3 back-to-back calls after an untimed one (median reported)."),
    warmup: int = typer.Option(2, min=0, help="Untimed calls first."),
    sample_repeats: int = typer.Option(1, min=1, help="Timed full samples per backend and batch."),
    no_sample: bool = typer.Option(False, "--no-sample", help="Time single calls only."),
    device: str = typer.Option(None, "--device", help="torch device to run on (default: where each artifact runs)."),
    allow_unverified: bool = typer.Option(False, ALLOW_FLAG, help=ALLOW_HELP),
) -> None:
    """Time one call and one whole sample of each backend beside the torch reference, interleaved.

    Leave OMP_WAIT_POLICY unset: PASSIVE slows torch eager and AOTInductor (every op wakes sleeping
    threads), ACTIVE slows the runner after them; runners take turns with a pause between them. On a
    loaded machine compare the ratios, not the times.
    """
    if json_out is not None and json_out.is_dir():
        raise fail(f"--json {json_out}: is a folder; name the JSON file to write")
    try:
        _check_batches(engine_dir, batch)
        with console.status("benchmarking") as status:
            result = bench_engine(engine_dir, backend or None, batch or None, repeats=repeats, warmup=warmup,
                                  sample_repeats=sample_repeats, full_sample=not no_sample, device=check_device(device),
                                  progress=lambda message: status.update(message), allow_unverified=allow_unverified)
    except EngineError as e:
        raise fail(str(e)) from None
    peak = ", ".join(f"{k} {v:.0f}" for k, v in result["peak_gflops"].items()) or "-"
    samples = "no samples" if no_sample else f"{sample_repeats} sample(s) of {result['solver']} x {result['num_steps']}"
    table = Table(title=f"{result['engine']}: medians ({repeats} calls after {warmup} warm-up; {samples}); peak GFLOP/s {peak}; load average "
                        f"{result['load_average']} on {result['cores']} cores before; meanwhile other processes "
                        f"{_num(result.get('others_cpus'), '.2f')} CPUs, steal {_num(result.get('steal_cpus'), '.2f')}",
                  title_justify="left")
    columns = ("backend", "precision", "batch", "call ms", "vs torch", "GFLOP/call", "GFLOP/s", "% peak", "sample s", "vs torch", "NFE", "loop")
    for column in columns:
        table.add_column(column, justify="left" if column in ("backend", "precision") else "right")
    for r in result["rows"]:
        overhead = r.get("loop_overhead")
        table.add_row(r["backend"], r["precision"], str(r["batch"]), f"{r['call_ms']:.2f}", _ratio(r["call_vs_torch"]),
                      f"{r['gflop_per_call']:.3f}", _num(r["gflops"]), _num(r.get("pct_peak"), ".0f"), _num(r.get("sample_s"), ".2f"),
                      _ratio(r.get("sample_vs_torch")), str(r.get("nfe", "-")), "-" if overhead is None else f"{100 * overhead:.1f}%")
    console.print(table)
    console.print("[dim]loop: share of the sample time spent outside the engine's calls (sampler work, copies, guards)[/]")
    for name, why in result.get("skipped", {}).items():
        console.print(f"[yellow]skipped[/] {name}: {why} (name it with --backend and {ALLOW_FLAG} to time it anyway)", soft_wrap=True)
    if result["warning"]:
        console.print(f"[yellow]warning[/]: {result['warning']}", soft_wrap=True)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(json_out, (json.dumps(result, indent=2) + "\n").encode())
        console.print(f"wrote {json_out}")


def _check_batches(engine_dir: Path, batches: list[int]) -> None:
    """Refuse batch sizes outside the engine's range (``bench_engine`` would clamp them); its
    ``engines.load`` of every backend refuses an unverified engine before any timing."""
    manifest = read_manifest(engine_dir)
    lo, hi = int(manifest["io"]["batch"].get("min", 1)), int(manifest["io"]["batch"].get("max", 1))
    if bad := [b for b in batches if not lo <= b <= hi]:
        raise EngineError(f"--batch {bad[0]}: outside the engine's batch range [{lo}, {hi}] (inputs.batch of its recipe)")


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _num(v: float | None, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)
