"""Reliability (issues 9.1 and 13): the parity verdict, no data lost, faults, tampering, leftovers.

Fault tests kill a build with SIGKILL at each stage and between the two renames of the directory
swap (in a subprocess), simulate a full disk (ENOSPC from the writes) and tamper with each kind of
engine file. Engines: a tiny 8x8 ONNX-only recipe built here, and the session's ``built_quickstart``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import yaml

from diffexport.cli import main
from diffexport.engines import EngineError, build_engine, load, mark, read_manifest
from diffexport.engines.build import recover
from diffexport.engines.manifest import engine_problems, sha256_file, write_manifest
from diffexport.engines.verdict import UnverifiedEngine
from diffexport.parity import parity_stage

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
REPO = Path(__file__).resolve().parents[1]
TINY8 = {
    "name": "tiny8",
    "model": {"class": "SongUNet", "init": {"seed": 5},
              "args": {"img_resolution": 8, "in_channels": 1, "out_channels": 1, "model_channels": 8, "channel_mult": [1],
                       "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0}},
    "preconditioner": {"class": "EDMPreconditioner", "args": {"sigma_data": 0.5}},
    "inputs": {"batch": {"min": 1, "opt": 1, "max": 2}},
    "sampler": {"scheduler": {"class": "EDMNoiseScheduler", "args": {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}},
                "solver": "euler", "num_steps": 3},
    "export": {"targets": ["onnx"]},
    "parity": {"num_sigmas": 2, "batch": 1},
}  # fmt: skip
PARITY = [("parity", parity_stage)]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def cli(capsys, *args: str) -> tuple[int, str]:
    """``diffexport ARGS`` in this process: (exit code, stdout + stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exit_info.value.code, out.out + out.err


def one_line_error(code: int, output: str) -> str:
    """The ``error:`` line of a failed command; asserts the failure is clean (no traceback)."""
    assert code not in (0, None), output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    return errors[0]


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rel-recipes") / "tiny8.yaml"
    path.write_text(yaml.safe_dump(TINY8, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory, tiny_recipe) -> Path:
    """The tiny recipe built with parity (status ok)."""
    result = build_engine(tiny_recipe, tmp_path_factory.mktemp("rel-engines") / "tiny8", finalize=PARITY)
    assert result.manifest["status"] == "ok"
    return result.engine_dir


@pytest.fixture
def engine(tmp_path, tiny_engine) -> Path:
    """A private copy of the tiny engine, to damage."""
    return shutil.copytree(tiny_engine, tmp_path / "tiny8")


# --- issue 9 item 1: the verdict -------------------------------------------------------------


@pytest.mark.parametrize("status", ["unchecked", "failed"])
def test_load_refuses_unverified_engines_unless_allowed(engine, status):
    mark(engine, status)
    with pytest.raises(UnverifiedEngine, match=f"status {status}.*--allow-unverified"):
        load(engine, "onnxruntime")
    assert load(engine, "onnxruntime", allow_unverified=True).backend == "onnxruntime"
    assert load(engine, "torch").backend == "torch"  # the reference itself is never refused


def test_load_refuses_a_backend_that_failed_parity(engine):
    m = read_manifest(engine)
    m["parity"]["backends"]["onnxruntime"]["passed"] = False
    write_manifest(engine, m)
    with pytest.raises(UnverifiedEngine, match="parity failed for backend onnxruntime"):
        load(engine, "onnxruntime")


def test_cli_sample_bench_refuse_and_parity_mark_verifies(tmp_path, capsys, engine):
    mark(engine, "unchecked")
    out = tmp_path / "s.npy"
    for args in (["sample", engine, "-o", out], ["bench", engine, "--repeats", "1", "--no-sample"]):
        line = one_line_error(*cli(capsys, *args))
        assert f"engine {engine}" in line and "status unchecked" in line and "--allow-unverified" in line
    assert not out.exists()
    code, output = cli(capsys, "sample", engine, "-o", out, "--allow-unverified")
    assert code == 0 and out.is_file(), output
    code, output = cli(capsys, "parity", engine, "--mark")  # checking an unchecked engine is allowed
    assert code == 0 and read_manifest(engine)["status"] == "ok", output
    code, output = cli(capsys, "sample", engine, "-o", out, "--overwrite")
    assert code == 0, output


def test_no_parity_build_is_unchecked_and_refused(tmp_path, capsys, tiny_recipe):
    out = tmp_path / "e"
    code, output = cli(capsys, "build", tiny_recipe, "--out", out, "--no-parity")
    assert code == 0 and read_manifest(out)["status"] == "unchecked", output
    line = one_line_error(*cli(capsys, "sample", out, "-o", tmp_path / "s.npy"))
    assert "`diffexport parity DIR --mark` verifies it" in line


@pytest.mark.parametrize("summary", [None, {"backends": {}}, {"backends": {"onnxruntime": None}}, {"backends": {"onnxruntime": {"passed": "yes"}}}])
def test_status_ok_needs_the_backend_listed_as_passed(engine, summary):
    """A hand-edited ``status: ok`` is not enough: the backend must be in the parity summary with passed true."""
    m = read_manifest(engine)
    m["parity"] = summary
    write_manifest(engine, m)
    with pytest.raises(UnverifiedEngine, match="parity (was not run|failed) for backend onnxruntime"):
        load(engine, "onnxruntime")
    assert load(engine, "onnxruntime", allow_unverified=True).backend == "onnxruntime"
    with pytest.raises(EngineError, match="no 'aoti' artifact in this engine"):  # not built: said so, not "unverified"
        load(engine, "aoti")


def test_parity_mark_of_one_backend_leaves_the_others_refused(tmp_path, capsys, tiny_recipe):
    """``parity --backend onnxruntime --mark`` on a --no-parity onnx + openvino build verifies onnxruntime only."""
    pytest.importorskip("openvino", reason="the openvino package is not installed")
    out = tmp_path / "e"
    code, output = cli(capsys, "build", tiny_recipe, "--out", out, "--no-parity", "--targets", "onnx,openvino")
    assert code == 0 and set(read_manifest(out)["artifacts"]) == {"onnx", "openvino"}, output
    code, output = cli(capsys, "parity", out, "--backend", "onnxruntime", "--mark")
    assert code == 0 and read_manifest(out)["status"] == "ok", output
    assert load(out, "onnxruntime").backend == "onnxruntime"
    line = one_line_error(*cli(capsys, "sample", out, "-o", tmp_path / "s.npy", "--backend", "openvino"))
    assert "parity was not run for backend openvino" in line and "--allow-unverified" in line
    code, output = cli(capsys, "parity", out, "--backend", "openvino", "--mark")  # checking it verifies it, onnxruntime stays
    assert code == 0 and {b for b, e in read_manifest(out)["parity"]["backends"].items() if e["passed"]} == {"onnxruntime", "openvino"}, output
    assert load(out, "openvino").backend == "openvino" and load(out, "onnxruntime").backend == "onnxruntime"


@pytest.mark.parametrize("args, flag", [
    (["--backend", "foo"], "--backend foo: unknown backend"),
    (["--backend", "aoti"], "--backend aoti: no 'aoti' artifact"),
    (["--backend", "torch", "--mark"], "--backend torch: the torch reference"),
    (["--per-call-rtol", "-1"], "--per-call-rtol: must be a finite number > 0"),
    (["--per-call-rtol", "nan"], "--per-call-rtol: must be a finite number > 0"),
    (["--final-rtol", "0"], "--final-rtol: must be a finite number > 0"),
])
def test_parity_refuses_bad_options_before_any_work(tmp_path, capsys, engine, args, flag):
    """One line naming the option; nothing written (the build's report and the manifest stay as they were)."""
    before = snapshot(engine)
    line = one_line_error(*cli(capsys, "parity", engine, *args))
    assert flag in line, line
    assert snapshot(engine) == before


def test_bench_json_folder_refused_before_timing(tmp_path, capsys, engine):
    """``--json FOLDER`` failed after the whole benchmark, naming a temporary file."""
    line = one_line_error(*cli(capsys, "bench", engine, "--json", tmp_path, "--repeats", "1", "--no-sample"))
    assert f"--json {tmp_path}: is a folder" in line, line


def test_bench_by_default_times_the_verified_backends_only(tmp_path, capsys, tiny_recipe):
    """An ok engine with one backend that failed parity (a targets: auto candidate): plain ``bench`` times the
    others and says what it skipped, instead of refusing the whole engine."""
    pytest.importorskip("openvino", reason="the openvino package is not installed")
    out = tmp_path / "e"
    code, output = cli(capsys, "build", tiny_recipe, "--out", out, "--no-parity", "--targets", "onnx,openvino")
    assert code == 0, output
    mark(out, "ok", {"backends": {"onnxruntime": {"passed": True}, "openvino": {"passed": False}}})
    code, output = cli(capsys, "bench", out, "--repeats", "1", "--warmup", "0", "--no-sample", "--batch", "1", "--json", tmp_path / "b.json")
    assert code == 0, output
    result = json.loads((tmp_path / "b.json").read_text())
    assert {r["backend"] for r in result["rows"]} == {"torch", "onnxruntime"}
    assert result["skipped"] == {"openvino": "parity failed for backend openvino"} and "skipped openvino" in output
    line = one_line_error(*cli(capsys, "bench", out, "--backend", "openvino", "--repeats", "1", "--no-sample"))
    assert "parity failed for backend openvino" in line  # named: refused


def test_parity_mark_with_report_elsewhere_updates_the_engines_report(tmp_path, capsys, engine):
    """The manifest's summary names the engine's ``parity.json``: a marked run must be that file, not a stale one."""
    stale = json.loads((engine / "parity.json").read_text())
    code, output = cli(capsys, "parity", engine, "--mark", "--report", tmp_path / "rep", "--per-call-rtol", "0.5")
    assert code == 0, output
    marked = json.loads((engine / "parity.json").read_text())
    assert marked == json.loads((tmp_path / "rep" / "parity.json").read_text()) and marked["created"] >= stale["created"]
    assert marked["backends"]["onnxruntime"]["tolerances"]["per_call_rtol"] == 0.5
    assert read_manifest(engine)["parity"]["backends"]["onnxruntime"]["tolerances"]["per_call_rtol"] == 0.5


def test_sample_refuses_a_condition_given_twice(tmp_path, capsys, built_dhariwal):
    """The last one silently won (``--label 1 -c class_labels=2`` sampled class 1); the C++ runner refuses it too."""
    for args, flag in ((["-c", "class_labels=1", "-c", "class_labels=2"], "--condition class_labels: given twice"),
                       (["-c", "class_labels=2", "--label", "1"], "--label: condition 'class_labels' is also given")):
        line = one_line_error(*cli(capsys, "sample", built_dhariwal, "-o", tmp_path / "s.npy", *args))
        assert flag in line, line
        assert not (tmp_path / "s.npy").exists()


# --- issue 13 item 1: data loss ----------------------------------------------------------------


def test_build_never_replaces_a_users_folder_holding_a_manifest(tmp_path, capsys, tiny_recipe, tiny_engine):
    """A foreign manifest.json, or even a real diffexport manifest beside the user's files: refused, nothing touched."""
    cases = {"foreign": {"manifest.json": b'{"name": "my npm package"}', "thesis.tex": b"years of work"},
             "copied": {"manifest.json": (tiny_engine / "manifest.json").read_bytes(), "thesis.tex": b"years of work"}}
    for name, files in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        for file, data in files.items():
            (folder / file).write_bytes(data)
        before = snapshot(folder)
        line = one_line_error(*cli(capsys, "build", tiny_recipe, "--out", folder, "--no-parity"))
        assert "refusing to replace it" in line, line
        assert snapshot(folder) == before and leftovers(folder) == []


def test_sample_never_overwrites_without_overwrite(tmp_path, capsys, tiny_engine):
    png, npy = tmp_path / "x.png", tmp_path / "x.npy"
    png.write_bytes(b"my drawing")
    line = one_line_error(*cli(capsys, "sample", tiny_engine, "-o", npy))
    assert "x.png already exists" in line and "--overwrite" in line
    assert png.read_bytes() == b"my drawing" and not npy.exists()
    png.unlink()
    npy.write_bytes(b"my array")
    one_line_error(*cli(capsys, "sample", tiny_engine, "-o", npy))
    assert npy.read_bytes() == b"my array" and not png.exists()
    code, output = cli(capsys, "sample", tiny_engine, "-o", npy, "--overwrite")
    assert code == 0 and np.load(npy).shape == (1, 1, 8, 8) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", output


# --- faults: SIGKILL at each stage and in the swap, full disk ---------------------------------

def killed_build(recipe: Path, engine: Path, where: str) -> int:
    """Build ``recipe`` into ``engine`` in a forked child that SIGKILLs itself when stage ``where``
    starts (``swap``: between the two renames of the directory swap); the child's wait status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            import diffexport.engines.build as build

            def progress(stage, event, seconds, detail):
                if stage == where and event == "start":
                    os.kill(os.getpid(), signal.SIGKILL)

            if where == "swap":
                real = os.rename

                def rename(src, dst):
                    real(src, dst)
                    if str(dst).endswith(".old"):  # the old engine moved aside, the new one not yet in place
                        os.kill(os.getpid(), signal.SIGKILL)

                build.os.rename = rename
            build_engine(recipe, engine, force=True, progress=progress, finalize=PARITY)
        finally:
            os._exit(3)
    return os.waitpid(pid, 0)[1]


STAGES = ["load", "export", "export:onnx", "parity", "swap"]


def test_kill_9_at_each_stage_and_in_the_swap_loses_nothing(tmp_path, capsys, tiny_recipe, engine):
    """After each kill the previous engine is intact (or restored by the next build's recovery), the
    killed build's hidden folder is refused by inspect and sample, and recovery removes it."""
    before = snapshot(engine)
    for where in STAGES:
        status = killed_build(tiny_recipe, engine, where)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (where, status)
        left = [engine.parent / name for name in leftovers(engine)]
        assert left, where
        if where == "swap":
            assert not engine.exists() and any(p.name.endswith(".old") for p in left)
        else:
            assert snapshot(engine) == before, where
        for hidden in left:
            for args in (["inspect", hidden], ["sample", hidden, "-o", tmp_path / "s.npy", "--allow-unverified"]):
                assert "leftover of an interrupted build" in one_line_error(*cli(capsys, *args)), (where, args)
        done = recover(engine)
        assert snapshot(engine) == before and leftovers(engine) == [], (where, done)
        assert read_manifest(engine)["status"] == "ok" and not engine_problems(engine, read_manifest(engine))


def test_recovery_keeps_a_leftover_folder_that_holds_foreign_files(engine):
    stale = engine.with_name(f".{engine.name}.{2**22 + 7}.abc.building")
    stale.mkdir()
    (stale / "mine.txt").write_text("not the build's")
    assert any("left" in line for line in recover(engine))
    assert (stale / "mine.txt").read_text() == "not the build's"


@pytest.mark.parametrize("where", ["weights", "recipe.yaml"])
def test_full_disk_fails_cleanly_and_keeps_the_old_engine(tmp_path, capsys, monkeypatch, tiny_recipe, engine, where):
    import diffexport.engines.build as build

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x"))

    monkeypatch.setattr(build.torch if where == "weights" else build, "save" if where == "weights" else "write_atomic", no_space)
    before = snapshot(engine)
    line = one_line_error(*cli(capsys, "build", tiny_recipe, "--out", engine, "--force"))
    assert "No space left on device" in line, line
    assert snapshot(engine) == before and leftovers(engine) == []


def test_full_disk_while_writing_samples_leaves_no_partial_file(tmp_path, capsys, monkeypatch, tiny_engine):
    import diffexport.fileio as fileio

    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    line = one_line_error(*cli(capsys, "sample", tiny_engine, "-o", tmp_path / "s.npy"))
    assert "No space left on device" in line
    assert list(tmp_path.iterdir()) == []


# --- tampering with each kind of file, paths out of the engine --------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


TAMPER = {
    "weights.pt": ("torch", lambda d: _truncate(d / "weights.pt")),
    "recipe.yaml": ("torch", lambda d: (d / "recipe.yaml").write_text((d / "recipe.yaml").read_text().replace("seed: 5", "seed: 6"))),
    "denoiser.onnx": ("onnxruntime", lambda d: _truncate(d / "denoiser.onnx")),
    "added file": (None, lambda d: (d / "denoiser.onnx.data").write_bytes(b"dropped in")),
}


@pytest.mark.parametrize("kind", list(TAMPER))
def test_tampering_is_found_by_inspect_and_load(capsys, engine, kind):
    backend, tamper = TAMPER[kind]
    tamper(engine)
    if backend is None:  # a file beside the engine's own is not loaded; inspect still passes, load too
        assert cli(capsys, "inspect", engine)[0] == 0
        return
    line = one_line_error(*cli(capsys, "inspect", engine))
    assert kind in line and "sha256 does not match" in line, line
    with pytest.raises(EngineError, match=f"{kind}: sha256 does not match"):
        load(engine, backend)


@pytest.mark.parametrize("path", ["../../../../etc/hostname", "/etc/hostname", "denoiser.onnx/../../tiny8/denoiser.onnx/../../x"])
def test_manifest_paths_must_stay_inside_the_engine(capsys, engine, path):
    m = read_manifest(engine)
    m["artifacts"]["onnx"] = {**m["artifacts"]["onnx"], "file": path, "files": {path: "0" * 64}}
    write_manifest(engine, m)
    with pytest.raises(EngineError, match="must be relative|leaves the engine directory"):
        load(engine, "onnxruntime")
    assert "manifest.json" in one_line_error(*cli(capsys, "inspect", engine))


def test_symlinked_artifact_out_of_the_engine_is_refused(tmp_path, engine):
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(engine / "denoiser.onnx", outside)
    (engine / "denoiser.onnx").symlink_to(outside)
    with pytest.raises(EngineError, match="leaves the engine directory"):
        load(engine, "onnxruntime")


@pytest.mark.parametrize("edit", ["no io", "no sampler", "no name", "io shape", "io dtype", "io key", "status", "sigmas NaN", "not json"])
def test_damaged_manifests_are_one_line_everywhere(tmp_path, capsys, engine, edit):
    path = engine / "manifest.json"
    m = json.loads(path.read_text())
    if edit.startswith("no "):
        del m[edit[3:]]
    elif edit == "io shape":
        m["io"]["inputs"][0]["shape"] = [-1, 3, 8, 8]
    elif edit == "io dtype":
        m["io"]["inputs"][1]["dtype"] = "complex64"
    elif edit == "io key":  # a key TensorSpec does not take (found by the manifest fuzzer): named, not a TypeError
        m["io"]["inputs"][0] = {"0": 1}
    elif edit == "status":
        m["status"] = "trust me"
    elif edit == "sigmas NaN":
        m["sampler"]["sigmas"][1] = float("nan")
    path.write_text("{not json" if edit == "not json" else json.dumps(m))
    for args in (["inspect", engine], ["sample", engine, "-o", tmp_path / "s.npy"], ["parity", engine],
                 ["bench", engine, "--repeats", "1", "--no-sample"]):  # fmt: skip
        line = one_line_error(*cli(capsys, *args))
        assert "manifest.json" in line, (args, line)
        if edit == "io key":
            assert "io.inputs[0] has unknown keys ['0']" in line and "TypeError" not in line, line


def test_png_grid_is_written_by_a_library_and_round_trips(tmp_path):
    import matplotlib.image

    from diffexport.runtime.images import save_png_grid, to_grid

    x = np.random.default_rng(1).uniform(-1, 1, size=(3, 3, 5, 4)).astype(np.float32)
    image = matplotlib.image.imread(save_png_grid(x, tmp_path / "g.png"))
    assert np.array_equal(np.round(image * 255).astype(np.uint8), to_grid(x))


def test_tree_hashing_helper_for_deploy_folders(tmp_path):
    """``record_tree`` / ``verify_record``: what the Triton and C++ stages use for the folders they write."""
    from diffexport.engines.manifest import hash_records, record_tree, verify_record

    repo = tmp_path / "triton" / "m" / "1"
    repo.mkdir(parents=True)
    (repo / "model.py").write_text("print('served')\n")
    (tmp_path / "triton" / "m" / "config.pbtxt").write_text("name: 'm'\n")
    manifest: dict = {}
    record = record_tree(tmp_path, manifest, "triton")
    assert manifest["hashes"]["triton"] is record and set(record["files"]) == {"triton/m/1/model.py", "triton/m/config.pbtxt"}
    assert "hashes.triton" in hash_records(manifest)
    verify_record(tmp_path, record)
    (repo / "__pycache__").mkdir()
    (repo / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"bytecode")  # written by Python on import: ignored
    verify_record(tmp_path, record)
    (repo / "model.py").write_text("import os; os.system('rm -rf ~')\n")
    with pytest.raises(EngineError, match="model.py: sha256 does not match"):
        verify_record(tmp_path, record)
    (repo / "model.py").write_text("print('served')\n")
    (repo / "extra.py").write_text("")
    with pytest.raises(EngineError, match="extra.py: file is not listed"):
        verify_record(tmp_path, record)
    (repo / "extra.py").unlink()
    (repo / "link").symlink_to("/etc/hostname")
    with pytest.raises(EngineError, match="not listed|symlinks"):
        verify_record(tmp_path, record)
    with pytest.raises(EngineError, match="symlinks and special files"):
        record_tree(tmp_path, manifest, "triton")
    with pytest.raises(EngineError, match="leaves the engine directory"):
        record_tree(tmp_path, manifest, "../elsewhere")
