"""Task-level parity: do an engine's samples *depict* what the reference's samples depict?

Tensor parity (:mod:`.checks`) bounds relative errors; a bf16 engine may pass it and still draw a
different digit. Here a *judge* (``parity.judge.name`` in the recipe) looks at whole samples:

* ``digits``: the shipped classifier of the quickstart's digits (:mod:`.digits`), whose 64-d
  penultimate features also give a Fréchet distance to held-out real digits;
* ``module:callable``: any ``f(samples [N, C, H, W] float32) -> labels [N]`` or
  ``-> (labels [N], features [N, D])`` (a 2-D float result counts as logits: labels = argmax,
  features = the logits).

The same ``samples`` seeds (requested classes cycling 0..K-1 through the engine's vector condition)
are sampled with the recipe's sampler, guidance included, through the torch reference and each
backend. Reported per backend: class agreement with the reference, the share classified as
requested (``accuracy``), and the Fréchet distance between Gaussian fits of the judge's features
(reference vs backend, and real vs generated when the judge knows real data). Gates:
``min_agreement``, ``max_frechet`` (reference vs backend), ``min_accuracy``.

Entry point for the harness: :func:`check_task`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffexport.engines.base import Engine
from diffexport.runtime.inputs import condition_specs
from diffexport.runtime.sampler import SamplerSpec, one_hot_condition, sample

__all__ = ["check_task", "frechet_distance", "judge_samples", "markdown_lines", "requested", "resolve_judge"]

JudgeFn = Callable[[Tensor], Any]


def resolve_judge(name: str) -> JudgeFn:
    """The judge named ``name``: ``digits`` or an importable ``module:callable``."""
    if name == "digits":
        from diffexport.parity.digits import load_judge

        judge = load_judge()

        def digits(x: Tensor) -> tuple[Tensor, Tensor]:
            features = judge.features(x)
            return judge.head(features).argmax(1), features

        return digits
    module, sep, attr = name.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"parity.judge.name: expected 'digits' or 'module:callable', got {name!r}")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"parity.judge.name: cannot import {name!r} ({e})") from None
    if not callable(fn):
        raise ValueError(f"parity.judge.name: {name!r} is not callable")
    return fn


@torch.no_grad()
def judge_samples(judge: JudgeFn, samples: Tensor) -> tuple[np.ndarray, np.ndarray | None]:
    """``(labels int64 [N], features float64 [N, D] or None)`` of ``samples`` by ``judge``."""
    out = judge(samples.detach().float().cpu())
    labels, features = out if isinstance(out, tuple) else (out, None)
    labels = torch.as_tensor(labels)
    if labels.ndim == 2 and labels.is_floating_point():  # logits
        labels, features = labels.argmax(1), labels if features is None else features
    if labels.ndim != 1 or labels.shape[0] != samples.shape[0]:
        raise ValueError(f"parity.judge: labels must have shape [{samples.shape[0]}], got {list(labels.shape)}")
    feats = None if features is None else torch.as_tensor(features).detach().double().reshape(samples.shape[0], -1).numpy()
    return labels.long().numpy(), feats


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of Gaussian fits to feature rows ``a`` [N, D] and ``b`` [M, D] (FID's formula):
    ``|μa - μb|² + tr(Σa + Σb - 2 (Σa^½ Σb Σa^½)^½)``, the square roots by symmetric eigendecomposition."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ sb @ root_a), 0, None)).sum()
    return float(max(mu @ mu + np.trace(sa) + np.trace(sb) - 2 * cross, 0.0))


def requested(engine: Engine, n: int) -> tuple[dict[str, Tensor], np.ndarray | None]:
    """Conditions for ``n`` task samples: the vector condition one-hot with classes ``i % K``
    (and those classes); an engine without conditions samples unconditionally (``None``)."""
    specs = condition_specs(engine)
    if not specs:
        return {}, None
    if len(specs) > 1 or specs[0].kind != "vector":
        raise ValueError(f"parity.judge: task parity needs an engine whose only condition is a vector, got {[s.name for s in specs]}")
    k = specs[0].shape[-1]
    name, one_hot = one_hot_condition(engine, list(range(k)), n)
    return {name: one_hot}, np.arange(n) % k


def _task_samples(engine: Engine, spec: SamplerSpec, n: int, seed: int) -> Tensor:
    conditions, _ = requested(engine, n)
    return sample(engine, spec, batch=n, seed=seed, conditions=conditions).cpu()


def _stats(labels: np.ndarray, feats: np.ndarray | None, want: np.ndarray | None, real: np.ndarray | None) -> dict:
    return {
        "accuracy": None if want is None else float((labels == want).mean()),
        "frechet_real": None if feats is None or real is None else frechet_distance(real, feats),
    }


def check_task(engine_dir, manifest: dict, entries: dict[str, dict], reference: Callable[[torch.device], Engine],
               device=None) -> dict:
    """Judge the samples of every backend in ``entries`` (the harness's report entries) against the
    reference's; adds ``entry["task"]`` and folds its verdict into ``entry["passed"]``. ``reference``
    gives the torch reference engine on a device (the harness's ``Reference.engine``); its samples
    are drawn once per device. Returns the report's ``task`` section (settings, the reference's figures)."""
    from diffexport.parity.harness import load_candidate

    cfg = manifest["recipe"]["parity"]["judge"]
    n, seed = int(cfg.get("samples", 100)), int(cfg.get("seed", 0))
    judge = resolve_judge(cfg["name"])
    spec = SamplerSpec.from_manifest(manifest["sampler"])
    real = None
    if cfg["name"] == "digits":
        from diffexport.parity.digits import load_digits16

        real = judge_samples(judge, load_digits16("test")[0])[1]
    section: dict[str, Any] = {"judge": cfg["name"], "samples": n, "seed": seed, "guidance": spec.guidance,
                               "gates": {k: cfg.get(k) for k in ("min_agreement", "max_frechet", "min_accuracy")}}
    memo: dict[torch.device, tuple[np.ndarray, np.ndarray | None]] = {}
    for backend, entry in entries.items():
        result: dict[str, Any] = {"passed": False}
        entry["task"] = result
        try:
            engine = load_candidate(engine_dir, backend, device)  # whatever its verdict: parity sets it
            _, want = requested(engine, n)
            if engine.device not in memo:
                memo[engine.device] = judge_samples(judge, _task_samples(reference(engine.device), spec, n, seed))
            ref_labels, ref_feats = memo[engine.device]
            section.setdefault("reference", _stats(ref_labels, ref_feats, want, real))
            labels, feats = judge_samples(judge, _task_samples(engine, spec, n, seed))
        except Exception as e:  # the backend fails task parity with its error
            result["error"] = f"{type(e).__name__}: {e}"
            entry["passed"] = False
            continue
        result.update(_stats(labels, feats, want, real))
        result["agreement"] = float((labels == ref_labels).mean())
        result["frechet_reference"] = None if feats is None else frechet_distance(ref_feats, feats)
        ok = result["agreement"] >= cfg.get("min_agreement", 0.97)
        if cfg.get("max_frechet") is not None and result["frechet_reference"] is not None:
            ok &= result["frechet_reference"] <= cfg["max_frechet"]
        if cfg.get("min_accuracy") is not None and result["accuracy"] is not None:
            ok &= result["accuracy"] >= cfg["min_accuracy"]
        result["passed"] = bool(ok)
        entry["passed"] = bool(entry["passed"] and ok)
    return section


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown_lines(report: dict) -> list[str]:
    """The ``parity.md`` section of task-level parity (empty without a judge)."""
    task = report.get("task")
    if not task:
        return []
    ref, gates = task.get("reference") or {}, task["gates"]
    lines = [
        "", "## Task parity", "",
        f"Judge `{task['judge']}` on {task['samples']} samples (seed {task['seed']}, classes cycling, guidance "
        f"{task['guidance'] if task['guidance'] is not None else 'none'}). Reference (torch fp32): accuracy "
        f"{_f(ref.get('accuracy'), '.1%')}, Fréchet distance to real data {_f(ref.get('frechet_real'), '.3f')}. "
        f"Gates: agreement ≥ {gates['min_agreement']}, Fréchet to reference ≤ {gates['max_frechet']}, "
        f"accuracy ≥ {gates['min_accuracy']}.", "",
        "| backend | precision | agreement with reference | accuracy | Fréchet to reference | Fréchet to real | result |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, e in report["backends"].items():
        t = e.get("task") or {}
        verdict = "pass" if t.get("passed") else f"**FAIL** {t.get('error', '')}".rstrip()
        lines.append(f"| {name} | {e['precision']} | {_f(t.get('agreement'), '.1%')} | {_f(t.get('accuracy'), '.1%')} | "
                     f"{_f(t.get('frechet_reference'), '.4f')} | {_f(t.get('frechet_real'), '.3f')} | {verdict} |")
    return lines
