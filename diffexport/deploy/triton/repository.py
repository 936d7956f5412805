"""Write an engine's Triton model repositories (layout in ``docs/ENGINE_FORMAT.md``).

Two repositories, same two models, same client-facing API::

    ENGINE_DIR/triton/            full: the denoiser runs in Triton's TensorRT / ONNX Runtime backend
      <name>_denoiser/config.pbtxt, 1/model.plan | 1/model.onnx (+ its external data files)
      <name>_sampler/config.pbtxt,  1/model.py     Python backend: sampler loop, BLS calls to the denoiser
    ENGINE_DIR/triton-python/     self-contained: only the Python backend is needed
      <name>_denoiser/config.pbtxt, 1/model.py     the engine in-process (ONNX Runtime, else AOTInductor)
      <name>_sampler/...                           as above

Model sources find the engine through the ``engine_dir`` parameter, a path relative to their model
folder (``../..``), so repositories survive the engine directory being renamed. Every file of a
repository is hashed into ``manifest["hashes"][<repository>]`` when written, and
:func:`verify_repository` checks them before a server executes anything from it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from diffexport.deploy.triton.backend import ALLOW_PARAM
from diffexport.deploy.triton.config import QUEUE_DELAY_MS, Instances, denoiser_config, sampler_config, to_pbtxt
from diffexport.engines.base import EngineError
from diffexport.engines.load import BACKENDS
from diffexport.engines.manifest import read_manifest, record_tree, verify_record, write_manifest
from diffexport.recipes import IOSpec

FULL, PYTHON_ONLY = "triton", "triton-python"
ENGINE_DIR_PARAM = "../.."  # from <repository>/<model>/ back to the engine directory
PYTHON_BACKENDS = ("onnxruntime", "aoti", "openvino")  # in-process runtimes of the self-contained denoiser, preferred first
# engine artifact -> (config.pbtxt platform or backend, the file it loads, the Triton backend serving it).
# The OpenVINO artifacts are served by Triton's OpenVINO backend from the engine's ONNX (the one they
# were compiled from), compiled there with the same precision hint; the cached blobs are for
# diffexport's own loader.
NATIVE = {
    "tensorrt": ("tensorrt_plan", "model.plan", "tensorrt"),
    "openvino": ("openvino", "model.onnx", "openvino"),
    "openvino-bf16": ("openvino", "model.onnx", "openvino"),
    "onnx": ("onnxruntime_onnx", "model.onnx", "onnxruntime"),
}
NATIVE_NEEDS = ("tensorrt", "onnx")  # the full repository needs one of these artifacts (OpenVINO serves the ONNX)
OPENVINO_PRECISION = {"fp32": {}, "bf16": {"HINT_BF16": "YES"}}  # the OpenVINO backend's precision parameters
# Triton's OpenVINO backend compiles the model for a static batch of max_batch_size and fails every
# execution of fewer rows unless ENABLE_BATCH_PADDING (its README; openvino.cc); it runs only KIND_CPU.
OPENVINO_BATCHING = {"ENABLE_BATCH_PADDING": "YES"}


def repository_dir(engine_dir: str | Path, python_only: bool = False) -> Path:
    """Where :func:`write_repository` puts the (full or self-contained) repository."""
    return Path(engine_dir) / (PYTHON_ONLY if python_only else FULL)


def model_names(name: str) -> tuple[str, str]:
    """``(denoiser, sampler)`` model names of engine ``name``."""
    return f"{name}_denoiser", f"{name}_sampler"


def _built(manifest: dict) -> str:
    return f"(built: {', '.join(manifest.get('artifacts', {})) or 'none'})"


def native_target(manifest: dict, gpu: bool = False) -> str:
    """The artifact served by Triton's own backend in the full repository: ``tensorrt`` if built;
    else, unless the denoiser is to run on GPUs (``gpu``: Triton's OpenVINO backend runs only on the
    CPU), the OpenVINO artifact that the build ranked fastest (``default_backend``), when it was
    compiled from the engine's ONNX; else ``onnx``."""
    arts = manifest.get("artifacts", {})
    if not any(t in arts for t in NATIVE_NEEDS):
        raise EngineError(f"engine '{manifest.get('name')}': the Triton repository needs a tensorrt or onnx artifact {_built(manifest)}")
    if "tensorrt" in arts:
        return "tensorrt"
    chosen = BACKENDS.get(manifest.get("default_backend") or "")
    if not gpu and chosen in arts and NATIVE.get(chosen, ("",))[0] == "openvino" and arts[chosen].get("source") == arts["onnx"]["file"]:
        return chosen
    return "onnx"


def python_only_reason(manifest: dict, backends: set[str] | None, *, forced: bool = False, gpu: bool = False) -> str | None:
    """Why the self-contained repository must be served on a Triton with ``backends`` (``None``: the full one can).
    ``backends=None``: a Triton not known here (``serve --write-only``), assumed to have the backend;
    ``gpu``: the denoiser is to run on GPUs (:func:`native_target`)."""
    if forced:
        return "--python-only"
    if manifest.get("recipe", {}).get("deploy", {}).get("triton_python_only"):
        return "the recipe sets deploy.triton_python_only"
    try:
        backend = NATIVE[native_target(manifest, gpu)][2]
    except EngineError:
        return "the engine has no onnx or tensorrt artifact for a native backend"
    return None if backends is None or backend in backends else f"this Triton has no {backend} backend (only {', '.join(sorted(backends))})"


def python_backend(manifest: dict) -> str:
    """The runtime the self-contained denoiser loads in-process: the engine's ranked ``default_backend``
    (``targets: auto``) when it runs in-process, else ``onnxruntime`` if built, else ``aoti``, else ``openvino``."""
    chosen = manifest.get("default_backend")
    if chosen and chosen != "tensorrt" and BACKENDS.get(chosen) in manifest.get("artifacts", {}):
        return chosen
    backend = next((b for b in PYTHON_BACKENDS if BACKENDS[b] in manifest.get("artifacts", {})), None)
    if backend is None:
        raise EngineError(f"engine '{manifest.get('name')}': the Python-only Triton repository needs an onnx or aoti artifact {_built(manifest)}")
    return backend


def served_backend(manifest: dict, python_only: bool = False, gpu: bool = False) -> str:
    """The runtime backend (``engines.load`` name) whose artifact the repository's denoiser runs (on
    GPUs with ``gpu``): the parity verdict that ``serve`` and the sampler model's ``initialize`` check."""
    if python_only:
        return python_backend(manifest)
    target = native_target(manifest, gpu)
    return next(b for b, t in BACKENDS.items() if t == target)


def _model_source(name: str) -> str:
    return resources.files("diffexport.deploy.triton").joinpath("models", f"{name}.py").read_text()


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def _write_model(repo: Path, config, files: dict[str, str | Path]) -> None:
    """``repo/<name>/config.pbtxt`` and ``repo/<name>/1/<file>`` (text, or a linked/copied file)."""
    version = repo / config.name / "1"
    version.mkdir(parents=True)
    (repo / config.name / "config.pbtxt").write_text(to_pbtxt(config))
    for fname, content in files.items():
        if isinstance(content, Path):
            _link_or_copy(content, version / fname)
        else:
            (version / fname).write_text(content)


# --- hashes of the written files (issue 13 item 4) ---------------------------------------------


def verify_repository(engine_dir: str | Path, manifest: dict, folder: str) -> None:
    """``EngineError`` (one line) unless every file under ``engine_dir/folder`` is in the manifest's
    hashes and unchanged: a missing record, a changed, missing or unlisted file is refused."""
    record = (manifest.get("hashes") or {}).get(folder)
    if not record:
        raise EngineError(f"{Path(engine_dir) / folder}: not hashed in manifest.json; rewrite it with `diffexport serve {engine_dir} --rewrite`")
    verify_record(engine_dir, record, f"hashes.{folder}")


def recipe_instances(manifest: dict) -> Instances:
    """The recipe's ``deploy.triton_instances`` (CPU), the default instance group."""
    return Instances(int(manifest.get("recipe", {}).get("deploy", {}).get("triton_instances", 1)))


def recipe_queue_delay_ms(manifest: dict) -> float:
    """The recipe's ``deploy.triton_queue_delay_ms``: how long the sampler's batcher waits."""
    return float(manifest.get("recipe", {}).get("deploy", {}).get("triton_queue_delay_ms", QUEUE_DELAY_MS))


def write_repository(engine_dir: str | Path, *, python_only: bool = False, manifest: dict | None = None,
                     instances: Instances | None = None, allow_unverified: bool = False, batching: bool = True,
                     queue_delay_ms: float | None = None) -> Path:
    """Write ``ENGINE_DIR/triton`` (or ``triton-python`` when ``python_only``) atomically and return it.

    ``manifest`` defaults to the engine's ``manifest.json`` (the build passes the one it is
    writing). The written files' hashes go into ``manifest["hashes"]``, and into
    ``manifest.json`` when ``manifest`` was read from it. ``instances`` defaults to the recipe's
    ``deploy.triton_instances`` on the CPU; ``allow_unverified`` lets the models serve an engine
    whose parity verdict is not ok (debugging); ``queue_delay_ms`` (default: the recipe's
    ``deploy.triton_queue_delay_ms``) is how long the sampler's batcher waits for more requests;
    ``batching=False`` (benchmarks) turns off the sampler's dynamic batching.
    """
    engine_dir = Path(engine_dir)
    persist = manifest is None
    manifest = manifest if manifest is not None else read_manifest(engine_dir)
    io = IOSpec.from_dict(manifest["io"])
    instances = instances or recipe_instances(manifest)
    denoiser, sampler = model_names(manifest["name"])
    params = {"engine_dir": ENGINE_DIR_PARAM, ALLOW_PARAM: "true" if allow_unverified else "false"}
    if python_only:
        den_cfg = denoiser_config(denoiser, io, instances=instances, parameters={**params, "backend": python_backend(manifest)})
        den_files: dict[str, str | Path] = {"model.py": _model_source("denoiser")}
    else:
        target = native_target(manifest, instances.on_gpu)
        platform, fname, _ = NATIVE[target]
        art = manifest["artifacts"][target]
        if target == "tensorrt" and not instances.on_gpu:
            instances = Instances(instances.count, instances.gpus, gpu=True)
        openvino = platform == "openvino"
        den_cfg = denoiser_config(denoiser, io, platform=platform, instances=instances, model_file=fname if openvino else None,
                                  parameters={**OPENVINO_PRECISION[art["precision"]], **OPENVINO_BATCHING} if openvino else None)
        if openvino:  # the ONNX it was compiled from, with its external data
            art = manifest["artifacts"]["onnx"]
        extra = [f for f in art.get("files", {}) if f != art["file"]]  # ONNX external data keeps its name
        den_files = {fname: engine_dir / art["file"], **{name: engine_dir / name for name in extra}}
        for f in den_files.values():
            if not f.is_file():
                raise EngineError(f"{f}: artifact file is missing (listed in manifest.json)")
    sam_params = {**params, "denoiser_model": denoiser, "denoiser_backend": served_backend(manifest, python_only, instances.on_gpu)}
    sam_cfg = sampler_config(sampler, io, instances=instances, parameters=sam_params,
                             image_hw=(manifest["sampler"].get("patching") or {}).get("img_shape"), batching=batching,
                             queue_delay_ms=recipe_queue_delay_ms(manifest) if queue_delay_ms is None else queue_delay_ms)

    final = repository_dir(engine_dir, python_only)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=engine_dir))
    try:
        tmp.chmod(0o755)  # as the engine directory: mkdtemp's 0700 would hide the repository from a server run by another user
        _write_model(tmp, den_cfg, den_files)
        _write_model(tmp, sam_cfg, {"model.py": _model_source("sampler")})
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=engine_dir))
            final.rename(old / final.name)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    record_tree(engine_dir, manifest, final.name)
    if persist:
        write_manifest(engine_dir, manifest)
    return final


def triton_stage(engine_dir: str | Path, manifest: dict) -> list[Path]:
    """Build stage for ``deploy.triton``: the full repository when the engine has an onnx/tensorrt
    artifact and ``deploy.triton_python_only`` is off, the self-contained one when it has an
    onnx/aoti artifact (always when ``triton_python_only``); returns the folders written."""
    arts, python_only = manifest.get("artifacts", {}), bool(manifest.get("recipe", {}).get("deploy", {}).get("triton_python_only"))
    full = not python_only and any(t in arts for t in NATIVE_NEEDS)
    written = [write_repository(engine_dir, manifest=manifest)] if full else []
    if python_only or not full or any(BACKENDS[b] in arts for b in PYTHON_BACKENDS):
        written.append(write_repository(engine_dir, python_only=True, manifest=manifest))
    return written
