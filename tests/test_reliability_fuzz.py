"""Property-based fuzzing of every input a user controls (issue 13 "Done when").

Valid recipes, manifests and ``sample`` command lines are mutated (types, ranges, missing and extra
keys, sizes, encodings). Property of every run: the command exits 0 or fails cleanly (non-zero,
exactly one ``error:`` line, no traceback), touches no file outside its output, and the process
stays under a memory bound. Recipes are checked by the one recipe validation (``check_recipe``);
a recipe it accepts stops at the build's first stage (nothing is exported here), so the budget
stays small: about 150 examples, bounded by ``max_examples``.
"""

from __future__ import annotations

import copy
import json
import resource
import shutil
from collections import Counter
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffexport.cli import main
from diffexport.engines.manifest import sha256_file

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
REPO = Path(__file__).resolve().parents[1]
MEMORY_BOUND_KB = 4 << 20  # 4 GiB peak resident set for the whole test process
SETTINGS = dict(deadline=None, database=None, print_blob=True, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TALLY: Counter = Counter()


class Accepted(Exception):
    """Raised where a build would start its real work: the recipe passed validation."""


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(capsys, args: list) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return info.value.code or 0, out.out + out.err


def assert_clean(code: int, output: str, what: str) -> None:
    """Exit 0, or non-zero with exactly one ``error:`` line and no traceback; memory under the bound."""
    TALLY[f"{what}: inputs"] += 1
    assert "Traceback" not in output, output
    if code != 0:
        TALLY[f"{what}: refused"] += 1
        assert sum(line.startswith("error:") for line in output.splitlines()) == 1, output
        assert "unexpected " not in output, f"not a validated refusal, only the CLI's catch-all: {output}"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < MEMORY_BOUND_KB


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    print("\nfuzz counts:", json.dumps(dict(sorted(TALLY.items()))))


# --- mutations of a JSON-like tree -------------------------------------------------------------

ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([0, -1, 1, 10**21, 2**63, -(2**31)]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["", "x" * 5000, "../../etc/passwd", "/etc/passwd", "\x00", "é✓", "1e400", "nan"]),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)  # fmt: skip


def _paths(tree, prefix=()) -> list[tuple]:
    out = []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        out.append((*prefix, key))
        out += _paths(value, (*prefix, key))
    return out


@st.composite
def mutated(draw, base: dict, max_mutations: int = 3) -> dict:
    """``base`` with 1..``max_mutations`` of: a value replaced by an odd one (or a number by another
    in a plausible range), a key deleted, an extra key."""
    tree = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, max_mutations))):
        paths = _paths(tree)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = tree
        for key in path[:-1]:
            parent = parent[key]
        op = draw(st.sampled_from(["replace", "replace", "tweak", "delete", "extra"]))
        value = parent[path[-1]]
        if op == "tweak" and isinstance(value, (int, float)) and not isinstance(value, bool):  # same type, plausible range
            parent[path[-1]] = draw(st.integers(-2, 64) if isinstance(value, int) else st.floats(-1.0, 100.0))
        elif op in ("replace", "tweak"):
            parent[path[-1]] = draw(ODD_VALUES)
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(ODD_VALUES)
        else:
            parent.append(draw(ODD_VALUES))
    return tree


ENCODINGS = ["yaml", "yaml", "yaml", "utf-16", "binary", "truncated", "bom", "nul", "alias bomb", "duplicate key", "huge"]


def encode(data: dict, how: str, rng: np.random.Generator) -> bytes:
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if how == "utf-16":
        return text.encode("utf-16")
    if how == "binary":
        return rng.integers(0, 256, 512, dtype=np.uint8).tobytes()
    if how == "truncated":
        return text.encode()[: len(text) // 2]
    if how == "bom":
        return b"\xef\xbb\xbf" + text.encode()
    if how == "nul":
        return text.encode().replace(b"\n", b"\n\x00", 1)
    if how == "alias bomb":
        rows = ["a: &a [x, x, x, x, x, x, x, x, x, x]"] + [f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]"
                                                       for p, c in zip("abcdefgh", "bcdefghi")]  # fmt: skip
        return ("\n".join(rows) + "\n" + text).encode()
    if how == "duplicate key":
        return (text + f"name: {data.get('name', 'x')}-again\n").encode()
    if how == "huge":
        return text.encode() + b"#" * (2 << 20)
    return text.encode()


# --- recipes -------------------------------------------------------------------------------------

QUICKSTART = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
# absolute, so the recipe written into a temporary folder still finds the shipped checkpoint
QUICKSTART["model"]["checkpoint"] = str(REPO / "recipes" / "models" / "digits.mdlus")


@settings(max_examples=40, **SETTINGS)
@given(recipe=mutated(QUICKSTART), how=st.sampled_from(ENCODINGS), seed=st.integers(0, 2**32 - 1))
def test_mutated_recipes_are_refused_cleanly_or_accepted(tmp_path_factory, capsys, recipe, how, seed):
    work = tmp_path_factory.mktemp("fuzz-recipe")
    user = work / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    (user / "manifest.json").write_text('{"not": "an engine"}')
    path = work / "recipe.yaml"
    path.write_bytes(encode(recipe, how, np.random.default_rng(seed)))
    before = snapshot(user)
    out = work / "engine"

    def accepted(*args, **kwargs):
        raise Accepted("ACCEPTED by validation")

    with mock.patch("diffexport.engines.build._denoiser", accepted):
        for target in (out, user):  # a new folder, and a user's folder that holds a manifest.json
            code, output = run_cli(capsys, ["build", path, "--out", target, "--no-parity"])
            if "ACCEPTED" in output:
                TALLY["recipes: accepted (stopped at load)"] += 1
                assert target == out, f"a build went ahead into a user's folder: {output}"
                continue
            assert_clean(code, output, "recipes")
            assert code != 0
    assert snapshot(user) == before
    assert not out.exists() and [p.name for p in work.iterdir()] == ["user", "recipe.yaml"]  # no leftovers either
    shutil.rmtree(work)


# --- manifests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_engine(tmp_path_factory, built_quickstart) -> tuple[Path, dict]:
    engine = shutil.copytree(built_quickstart, tmp_path_factory.mktemp("fuzz-engine") / "quickstart")
    return engine, json.loads((engine / "manifest.json").read_text())


@settings(max_examples=30, **SETTINGS)
@given(data=st.data())
def test_mutated_manifests_fail_cleanly(tmp_path_factory, capsys, fuzz_engine, data):
    engine, original = fuzz_engine
    manifest = data.draw(mutated(original, max_mutations=2))
    raw = json.dumps(manifest).encode()
    if data.draw(st.integers(0, 9)) == 0:
        raw = data.draw(st.sampled_from([raw[: len(raw) // 2], b"\xff\xfe" + raw, b"[]", b"null", b"{" * 100000]))
    files = {p: sha256_file(p) for p in engine.iterdir() if p.is_file() and p.name != "manifest.json"}
    (engine / "manifest.json").write_bytes(raw)
    out = tmp_path_factory.mktemp("fuzz-out") / "s.npy"
    try:
        for args in (["inspect", engine], ["sample", engine, "-o", out, "--steps", "2", "--allow-unverified"]):
            assert_clean(*run_cli(capsys, args), "manifests")
    finally:
        (engine / "manifest.json").write_text(json.dumps(original, indent=2))
    assert {p: sha256_file(p) for p in files} == files  # the engine's other files untouched
    assert {p.name for p in out.parent.iterdir()} <= {"s.npy", "s.png"}


# --- sample command lines ------------------------------------------------------------------------

DTYPES = ["<f4", ">f4", "<f8", "<f2", "<c8", "|b1", "<i4", "|u1", ">f8"]


def mostly(valid, odd) -> st.SearchStrategy:
    """``valid`` values three times out of four, else ``odd`` ones (so several odd flags rarely mask each other)."""
    return st.one_of(valid, valid, valid, odd)


@st.composite
def sample_args(draw, tmp: Path) -> list:
    args: list = []
    if draw(st.booleans()):
        args += ["--batch", draw(mostly(st.integers(1, 3), st.sampled_from([0, -1, 10**9, 2**70, "x", ""])))]
    args += ["--steps", draw(mostly(st.integers(1, 3), st.sampled_from([0, -5, 10**6, 2**70, "two"])))]
    if draw(st.booleans()):
        args += ["--seed", draw(mostly(st.integers(0, 2**63 - 1), st.sampled_from([-1, 2**64, 2**70, "x"])))]
    if draw(st.booleans()):
        args += ["--device", draw(mostly(st.sampled_from(["cpu", "cpu:0"]), st.sampled_from(["cuda", "cuda:7", "potato", "", "meta", "mps", "cuda:-1"])))]
    if draw(st.booleans()):
        args += ["--backend", draw(mostly(st.sampled_from(["onnxruntime", "torch"]), st.sampled_from(["aoti", "tflite", "", "openvino"])))]
    if draw(st.booleans()):
        dtype = draw(mostly(st.sampled_from(["<f4", ">f4", "<f8", ">f8", "<f2"]), st.sampled_from(["<c8", "|b1", "<i4", "|u1"])))
        shape = draw(mostly(st.sampled_from([(1, 1, 16, 16), (2, 1, 16, 16)]),  # the quickstart's x: [B, 1, 16, 16]
                            st.sampled_from([(0, 1, 16, 16), (1, 3, 16, 16), (1, 1, 8, 8), (1, 16, 16), (1, 1, 1, 16, 16)])))
        array = np.random.default_rng(0).normal(size=shape).astype(dtype)
        if draw(st.integers(0, 4)) == 0 and array.size and array.dtype.kind == "f":
            array.flat[0] = np.nan
        np.save(tmp / "latents.npy", array)
        args += ["--latents", draw(mostly(st.just(tmp / "latents.npy"), st.sampled_from([tmp / "absent.npy", tmp])))]
    if draw(st.booleans()):  # the quickstart's class_labels condition
        args += ["--label", draw(mostly(st.sampled_from(["3", "0,1", "9"]), st.sampled_from(["-1", "x", "10", "3,", "", str(2**70)])))]
    if draw(st.integers(0, 5)) == 0:
        args += ["--condition", draw(st.sampled_from(["x", "=", "cond=", "cond=/etc/passwd", f"c={tmp / 'latents.npy'}"]))]
    args += ["-o", draw(mostly(st.just(tmp / "out" / "s.npy"),
                               st.sampled_from([tmp / "out" / "s.png", tmp / "out", tmp / "user" / "mine.npy", tmp / "out" / "s"])))]
    if draw(st.integers(0, 3)) == 0:
        args.append(draw(st.sampled_from(["--overwrite", "--cuda-graph", "--unknown-flag", "--allow-unverified"])))
    return args


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_sample_command_lines_fail_cleanly(tmp_path_factory, capsys, built_quickstart, data):
    tmp = tmp_path_factory.mktemp("fuzz-cli")
    (tmp / "out").mkdir()
    (tmp / "user").mkdir()
    (tmp / "user" / "mine.npy").write_bytes(b"user data")
    (tmp / "user" / "mine.png").write_bytes(b"user picture")
    args = data.draw(sample_args(tmp))
    engine_before, user_before = snapshot(built_quickstart), snapshot(tmp / "user")
    code, output = run_cli(capsys, ["sample", built_quickstart, *args])
    assert_clean(code, output, "sample args")
    assert snapshot(built_quickstart) == engine_before
    if "--overwrite" not in args:
        assert snapshot(tmp / "user") == user_before
    shutil.rmtree(tmp)
