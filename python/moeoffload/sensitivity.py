"""The expert error-sensitivity study: perturb experts, evaluate, restore.

The experiment of MoE-Compression (Gaussian noise of std alpha x mean|w| on
chosen experts), made exact and extended to real codecs: a perturbation is
either that noise or a real compress -> decompress round trip (szp, sz3) at the
bound alpha x mean|w| (eb-mode "meanabs"; "abs" and "rel" bounds too). The
original weights are restored bit for bit after every cell.

Scopes (which experts one cell perturbs):
  expert  the most used expert of one layer (usage counted on the eval text)
  layer   all experts of one layer
  group   the shallow, middle or deep third of the MoE layers
  all     every MoE layer

Metrics: perplexity and next-token accuracy on held-out text; bits per weight
of the real codec at the cell's bound. Results go to a directory
(results.json, results.csv, plots); a run resumes: finished cells are read
back, not recomputed (only when measured on the same model, text, seq and seed).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .codec import absolute_bound, bound_value, compress
from .errors import InvalidArgumentError, InvalidBoundError, NoMoeLayersError
from .evaluation import encode, evaluate, lm_eval_tasks, router_choices, windows
from .table import MatrixRef, find_expert_matrices

SCOPES = ("expert", "layer", "group", "all")
PERTURBATIONS = ("gaussian", "sz3", "szp", "szpe")  # szpe: szp's values (the same damage), its entropy-coded size
EB_MODES = ("meanabs", "abs", "rel")
GROUPS = ("shallow", "middle", "deep")


# ---- the model and its experts ---------------------------------------------------------

def load_model(path="default"):
    """A causal LM for evaluation on the CPU, float32 (the shipped tiny model by default)."""
    from .models import tiny_moe

    if path in (None, "default"):
        return tiny_moe.load(None), tiny_moe.DEFAULT_DIR
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), Path(path)


class ExpertGrid:
    """The expert matrices of a loaded model, by MoE layer position 0..L-1 and expert."""

    def __init__(self, model):
        shapes = {k: (tuple(p.shape), p.dtype) for k, p in model.named_parameters()}
        grid = find_expert_matrices(shapes)
        if not grid:
            raise NoMoeLayersError(f"{type(model).__name__} has no Mixture-of-Experts layers (no expert matrices found)")
        self.model_layers = sorted({l for l, _ in grid})
        self.num_layers = len(self.model_layers)
        self.experts_per_layer = 1 + max(e for _, e in grid)
        self._params = dict(model.named_parameters())
        self._grid = grid

    def matrices(self, layer: int, expert: int) -> list[MatrixRef]:
        return self._grid[(self.model_layers[layer], expert)]

    def view(self, ref: MatrixRef) -> torch.Tensor:
        p = self._params[ref.key].data
        return p[ref.index] if ref.index is not None else p

    def group_layers(self, group: str) -> list[int]:
        """Thirds of the MoE layers; with L % 3 != 0 the middle third takes the extra layers."""
        L = self.num_layers
        a, b = L // 3, L - L // 3
        return {"shallow": list(range(0, a)), "middle": list(range(a, b)), "deep": list(range(b, L))}[group]


@dataclass
class Perturbation:
    method: str
    alpha: float
    eb_mode: str = "meanabs"
    seed: int = 0
    bits: float = 0.0       # compressed bits (real codecs)
    weights: int = 0
    max_err_over_eb: float = 0.0

    @property
    def bits_per_weight(self) -> float | None:
        return self.bits / self.weights if self.method != "gaussian" and self.weights else None


def check_args(method: str, alphas, eb_mode: str, scopes) -> list[float]:
    """Raise a named error for an unknown method, eb-mode or scope or a bad alpha; returns the alphas as floats
    (Python or numpy numbers and 0-d tensors are accepted, as everywhere a bound is)."""
    if method not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {method!r} (expected one of {', '.join(PERTURBATIONS)})")
    if eb_mode not in EB_MODES:
        raise ValueError(f"unknown eb-mode {eb_mode!r} (expected one of {', '.join(EB_MODES)})")
    for s in scopes:
        if s not in SCOPES:
            raise ValueError(f"unknown scope {s!r} (expected one of {', '.join(SCOPES)})")
    try:
        return [bound_value(a) for a in alphas]
    except InvalidBoundError as e:
        raise InvalidBoundError(f"alpha: {e}") from None


@contextmanager
def replaced(grid: ExpertGrid, experts: list[tuple[int, int]], new_weight):
    """Set every matrix of `experts` ((layer, expert) pairs) to new_weight(layer, expert, ref, original);
    restore the originals bit for bit on exit, also after an exception."""
    saved = []
    try:
        with torch.no_grad():
            for layer, expert in experts:
                for ref in grid.matrices(layer, expert):
                    w = grid.view(ref)
                    original = w.clone()
                    saved.append((w, original))
                    w.copy_(new_weight(layer, expert, ref, original))
        yield
    finally:
        with torch.no_grad():
            for w, original in reversed(saved):
                w.copy_(original)


@contextmanager
def perturbed(grid: ExpertGrid, experts: list[tuple[int, int]], pert: Perturbation):
    """Apply `pert` to the matrices of `experts` ((layer, expert) pairs); restore them exactly on exit."""
    gen = torch.Generator().manual_seed(pert.seed)

    def new_weight(layer, expert, ref, original):
        pert.weights += original.numel()
        bound = absolute_bound(original, pert.alpha, pert.eb_mode)
        if pert.method == "gaussian":
            noise = torch.randn(original.shape, generator=gen, dtype=torch.float32) * bound
            return (original.float() + noise).to(original.dtype)
        ct = compress(original, bound, mode="abs", codec=pert.method)
        rec = ct.decompress(dtype=original.dtype)
        pert.max_err_over_eb = max(pert.max_err_over_eb, float((rec.double() - original.double()).abs().max()) / bound)
        pert.bits += 8 * ct.nbytes
        return rec

    with replaced(grid, experts, new_weight):
        yield pert


# ---- evaluation -------------------------------------------------------------------------

def expert_usage(model, batches: torch.Tensor, grid: ExpertGrid) -> np.ndarray:
    """[layers, experts]: how often each expert is in a token's top-k on the eval text."""
    choices = router_choices(model, batches)
    return np.stack([np.bincount(choices[:, :, l].ravel(), minlength=grid.experts_per_layer)
                     for l in range(grid.num_layers)]).astype(np.int64)


# ---- the study ----------------------------------------------------------------------------

@dataclass
class Study:
    model_path: str = "default"
    perturb: str = "szp"
    alphas: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.8])
    eb_mode: str = "meanabs"
    scopes: list[str] = field(default_factory=lambda: ["layer"])
    data: str = "default"
    max_bytes: int = 32768
    seq: int = 256
    seed: int = 0
    tasks: list[str] = field(default_factory=list)
    task_limit: int | None = None

    def cells(self, grid: ExpertGrid, usage: np.ndarray):
        """(scope, target name, [(layer, expert)], alpha) for every cell of the study."""
        for scope in self.scopes:
            if scope == "expert":
                targets = [(f"L{l}E{int(usage[l].argmax())}", [(l, int(usage[l].argmax()))]) for l in range(grid.num_layers)]
            elif scope == "layer":
                targets = [(f"L{l}", [(l, e) for e in range(grid.experts_per_layer)]) for l in range(grid.num_layers)]
            elif scope == "group":
                targets = [(g, [(l, e) for l in grid.group_layers(g) for e in range(grid.experts_per_layer)])
                           for g in GROUPS if grid.group_layers(g)]
            else:
                targets = [("all", [(l, e) for l in range(grid.num_layers) for e in range(grid.experts_per_layer)])]
            for name, experts in targets:
                for alpha in self.alphas:
                    yield scope, name, experts, alpha


def cell_key(scope: str, target: str, method: str, eb_mode: str, alpha: float) -> str:
    return f"{scope}|{target}|{method}|{eb_mode}|{alpha:g}"


def load_text(data: str, model_dir: Path) -> bytes:
    from .models import tiny_moe

    if data in (None, "default"):
        return tiny_moe.default_heldout()
    p = Path(data)
    if not p.exists():
        raise FileNotFoundError(f"evaluation data {data} not found")
    return p.read_bytes()


def parameters_digest(model) -> str:
    """blake2b over every parameter's name, shape, dtype and first 64 KiB of bytes: tells another model's
    (or a fine-tuned) weights from these without reading all of a big model."""
    h = hashlib.blake2b(digest_size=16)
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype};".encode())
        h.update(flat[: 65536 // flat.element_size()].cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# What the baseline and every cell were measured on (results.json's "measured_on"), and how a mismatch is named.
MEASURED_ON = {"weights_blake2b": "model weights",
               "text_sha256": "evaluation text (--data, --max-bytes)", "tokens": "number of evaluation tokens",
               "seq": "--seq", "seed": "--seed", "tasks": "--tasks", "task_limit": "--task-limit"}


def _check_resumable(doc, record: dict, results_file: Path) -> None:
    """Earlier results are reused only when measured on what this run measures on; else a named error
    (never silently mixed in, nor thrown away)."""
    if not isinstance(doc, dict):
        raise InvalidArgumentError(f"{results_file} is not a sensitivity study's results; "
                                   "choose another --out or move it away")
    if not doc.get("cells") and not doc.get("baseline"):
        return  # nothing measured yet
    old = doc.get("measured_on")
    if not isinstance(old, dict):
        raise InvalidArgumentError(f"{results_file} does not record what its baseline and cells were measured on "
                                   "(an older moeoffload wrote it), so they cannot be trusted to match this study: "
                                   "choose another --out or move the old study away")
    diffs = []
    for key, name in MEASURED_ON.items():
        if old.get(key) != record[key]:
            short = key not in ("weights_blake2b", "text_sha256") and len(repr(old.get(key))) <= 200
            diffs.append(f"{name} ({old.get(key)!r} there, {record[key]!r} now)" if short else name)
    if diffs:
        raise InvalidArgumentError(f"{results_file} was measured on another study: {'; '.join(diffs)} "
                                   f"{'differ' if len(diffs) > 1 else 'differs'}; "
                                   "choose another --out or move the old study away")


def run(study: Study, out_dir: Path, progress: bool = True) -> dict:
    """Run (or resume) the study; returns the results document also written to out_dir.

    A resumed run reuses the baseline and the finished cells only when they were measured on the same model,
    weights, evaluation text, seq, seed and tasks (else InvalidArgumentError); other perturbations, eb-modes,
    alphas and scopes add their cells to the same study."""
    from tqdm.auto import tqdm

    study.alphas = check_args(study.perturb, study.alphas, study.eb_mode, study.scopes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_file = out_dir / "results.json"
    doc = json.loads(results_file.read_text()) if results_file.exists() else {}

    model, model_dir = load_model(study.model_path)
    grid = ExpertGrid(model)
    text = load_text(study.data, model_dir)[: study.max_bytes]
    batches = windows(encode(model_dir, model, text), study.seq, getattr(model.config, "bos_token_id", None))
    record = {"weights_blake2b": parameters_digest(model),  # (not the directory: a moved copy is the same model)
              "text_sha256": hashlib.sha256(bytes(text)).hexdigest(), "tokens": int(batches[:, 1:].numel()),
              "seq": study.seq, "seed": study.seed, "tasks": list(study.tasks), "task_limit": study.task_limit}
    _check_resumable(doc, record, results_file)
    cells = {c["key"]: c for c in doc.get("cells", [])}
    base = doc.get("baseline")
    if base is None:
        base = evaluate(model, batches)
        if study.tasks:
            base["tasks"] = lm_eval_tasks(model, study.tasks, study.task_limit)
    usage = expert_usage(model, batches, grid)
    doc = {
        "study": {k: (str(v) if isinstance(v, Path) else v) for k, v in study.__dict__.items()},
        "model": {"path": str(model_dir), "moe_layers": grid.num_layers, "experts_per_layer": grid.experts_per_layer,
                  "model_layers": grid.model_layers},
        "measured_on": record,
        "baseline": base,
        "usage": usage.tolist(),
        "groups": {g: grid.group_layers(g) for g in GROUPS},
        "cells": list(cells.values()),
    }
    todo = list(study.cells(grid, usage))
    bar = tqdm(todo, desc=f"sensitivity ({study.perturb})", unit="cell", disable=not progress)
    for scope, target, experts, alpha in bar:
        key = cell_key(scope, target, study.perturb, study.eb_mode, alpha)
        if key in cells:
            continue
        t0 = time.perf_counter()
        pert = Perturbation(study.perturb, alpha, study.eb_mode, seed=study.seed)
        with perturbed(grid, experts, pert):
            metrics = evaluate(model, batches)
            if study.tasks:
                metrics["tasks"] = lm_eval_tasks(model, study.tasks, study.task_limit)
        cell = {
            "key": key, "scope": scope, "target": target, "method": study.perturb, "eb_mode": study.eb_mode,
            "alpha": alpha, "layers": sorted({l for l, _ in experts}), "experts": len(experts),
            "ppl": metrics["ppl"], "acc": metrics["acc"],
            "dppl_pct": 100.0 * (metrics["ppl"] / base["ppl"] - 1.0),
            "dacc_pts": 100.0 * (metrics["acc"] - base["acc"]),
            "bits_per_weight": pert.bits_per_weight, "max_err_over_eb": pert.max_err_over_eb or None,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        if "tasks" in metrics:
            cell["tasks"] = metrics["tasks"]
        cells[key] = cell
        doc["cells"] = list(cells.values())
        _write(doc, out_dir)
    _write(doc, out_dir)
    return doc


def _write(doc: dict, out_dir: Path) -> None:
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(out_dir / "results.json")
    cols = ["scope", "target", "method", "eb_mode", "alpha", "ppl", "acc", "dppl_pct", "dacc_pts", "bits_per_weight",
            "max_err_over_eb", "experts", "seconds"]
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for c in doc["cells"]:
            w.writerow(c)


def plot(doc: dict, out_dir: Path) -> list[Path]:
    """Heatmap (layer x alpha -> delta ppl %) for the layer and expert scopes; a line plot per scope."""
    from .extras import require

    matplotlib = require("matplotlib", "the sensitivity plots")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    written = []
    cells = doc["cells"]
    methods = sorted({c["method"] for c in cells})
    for scope in ("layer", "expert"):
        for method in methods:
            sel = [c for c in cells if c["scope"] == scope and c["method"] == method]
            if not sel:
                continue
            layers = sorted({c["layers"][0] for c in sel})
            alphas = sorted({c["alpha"] for c in sel})
            grid = np.full((len(layers), len(alphas)), np.nan)
            for c in sel:
                grid[layers.index(c["layers"][0]), alphas.index(c["alpha"])] = c["dppl_pct"]
            fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(alphas), 1.0 + 0.4 * len(layers)))
            lim = min(np.nanmax(np.abs(grid)), 10.0) or 1.0  # beyond +-10% the colour saturates
            im = ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
            ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
            ax.set_yticks(range(len(layers)), [str(l) for l in layers])
            ax.set_xlabel("alpha (bound = alpha x mean|w|)" if doc["study"]["eb_mode"] == "meanabs" else "alpha")
            ax.set_ylabel("MoE layer")
            ax.set_title(f"{method}, scope {scope}: Δ perplexity %")
            for i in range(len(layers)):
                for j in range(len(alphas)):
                    if not np.isnan(grid[i, j]):
                        v = grid[i, j]
                        ax.text(j, i, f"{v:.1f}" if abs(v) < 1000 else f"{v:.0e}", ha="center", va="center", fontsize=7)
            fig.colorbar(im, ax=ax)
            fig.tight_layout()
            path = out_dir / f"heatmap-{scope}-{method}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    for scope in sorted({c["scope"] for c in cells}):
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in methods:
            sel = [c for c in cells if c["scope"] == scope and c["method"] == method]
            for target in sorted({c["target"] for c in sel}, key=_target_order):
                pts = sorted((c["alpha"], c["dppl_pct"]) for c in sel if c["target"] == target)
                ax.plot(*zip(*pts), marker="o", label=f"{target} ({method})" if len(methods) > 1 else target)
        ax.axhline(0, color="grey", lw=0.5)
        if any(abs(c["dppl_pct"]) > 100 for c in cells if c["scope"] == scope):
            ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xlabel("alpha")
        ax.set_ylabel("Δ perplexity %")
        ax.set_title(f"scope {scope}")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out_dir / f"lines-{scope}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _target_order(name: str):
    order = {"shallow": 0, "middle": 1, "deep": 2, "all": 3}
    if name in order:
        return (0, order[name], "")
    digits = "".join(ch if ch.isdigit() else " " for ch in name).split()
    return (1, int(digits[0]) if digits else 0, name)


# ---- per-layer policy from a study ------------------------------------------------------------

def measure_bounds(doc: dict, bounds: dict[int, float], method: str | None = None) -> dict:
    """Perturb every layer at its own bound (a real codec round trip) and evaluate on the study's text."""
    from contextlib import ExitStack

    st = doc["study"]
    model, model_dir = load_model(st["model_path"])
    grid = ExpertGrid(model)
    if grid.num_layers != doc["model"]["moe_layers"]:
        raise InvalidArgumentError(f"the study says model.moe_layers {doc['model']['moe_layers']}, but its model "
                                   f"{st['model_path']} has {grid.num_layers} MoE layers")
    text = load_text(st["data"], model_dir)[: st["max_bytes"]]
    batches = windows(encode(model_dir, model, text), st["seq"], getattr(model.config, "bos_token_id", None))
    perts = []
    with ExitStack() as stack:
        for layer, alpha in sorted(bounds.items()):
            pert = Perturbation(method or st["perturb"], alpha, st["eb_mode"], seed=st["seed"])
            stack.enter_context(perturbed(grid, [(layer, e) for e in range(grid.experts_per_layer)], pert))
            perts.append(pert)
        metrics = evaluate(model, batches)
    base = doc["baseline"]
    bits = sum(p.bits for p in perts)
    weights = sum(p.weights for p in perts)
    return {"ppl": metrics["ppl"], "acc": metrics["acc"], "dppl_pct": 100.0 * (metrics["ppl"] / base["ppl"] - 1.0),
            "dacc_pts": 100.0 * (metrics["acc"] - base["acc"]),
            "bits_per_weight": bits / weights if weights and (method or st["perturb"]) != "gaussian" else None}


def policy_from_study(doc: dict, max_dppl_pct: float, progress: bool = True) -> dict:
    """The per-layer bound policy (moeoffload.table.build's format) within a perplexity budget,
    next to the best uniform bound within the same budget, both measured."""
    from .policy import POLICY_FORMAT, choose_bounds

    st = doc["study"]
    if st["perturb"] == "gaussian":
        raise ValueError("a bound policy needs a study with a real codec (--perturb szp or sz3): Gaussian noise has no size")
    if not (math.isfinite(max_dppl_pct) and max_dppl_pct > 0):
        raise ValueError(f"--max-dppl must be a positive percentage, got {max_dppl_pct}")
    # Only the study's own perturbation and eb-mode: other cells' bounds are in other units, or have no size.
    own = [c for c in doc["cells"] if c.get("method") == st["perturb"] and c.get("eb_mode") == st["eb_mode"]]
    if doc["cells"] and not own:
        raise InvalidArgumentError(f"none of the study's {len(doc['cells'])} cells was measured with its perturbation "
                                   f"{st['perturb']} at eb-mode {st['eb_mode']}; run it with --perturb "
                                   f"{st['perturb']} --eb-mode {st['eb_mode']} --scope layer")
    layer_cells = [c for c in own if c["scope"] == "layer"]
    if not layer_cells:
        raise ValueError("the study has no 'layer' scope cells; run it with --scope layer")
    L = doc["model"]["moe_layers"]
    beyond = sorted({l for c in layer_cells for l in c["layers"] if l >= L})
    if beyond:
        raise InvalidArgumentError(f"the study has cells for MoE layers {beyond}, but model.moe_layers says {L}")
    if any(c["bits_per_weight"] is None for c in layer_cells):
        raise InvalidArgumentError(f"the study's {st['perturb']} cells lack bits_per_weight")
    options = {l: [(c["alpha"], c["dppl_pct"], c["bits_per_weight"]) for c in layer_cells if c["layers"] == [l]]
               for l in range(L)}
    missing = [l for l, o in options.items() if not o]
    if missing:
        raise ValueError(f"the study has no layer cells for MoE layers {missing}")
    alphas = sorted({c["alpha"] for c in layer_cells})
    log = []
    budget, chosen, measured = max_dppl_pct, None, None
    for _ in range(8):
        chosen = choose_bounds(options, budget)
        if chosen is None:
            break
        measured = measure_bounds(doc, chosen)
        log.append({"planning_budget_pct": budget, "bounds": chosen, "measured_dppl_pct": measured["dppl_pct"]})
        if progress:
            print(f"  planned within {budget:.3f}%: measured Δppl {measured['dppl_pct']:+.3f}%, "
                  f"{measured['bits_per_weight']:.3f} bits/w")
        if measured["dppl_pct"] <= max_dppl_pct:
            break
        budget *= 0.7  # damages did not add up: plan tighter
    if chosen is None or measured is None or measured["dppl_pct"] > max_dppl_pct:
        chosen = {l: alphas[0] for l in range(L)}
        measured = measure_bounds(doc, chosen)
    uniform = None
    for a in reversed(alphas):
        m = measure_bounds(doc, {l: a for l in range(L)})
        if progress:
            print(f"  uniform alpha {a:g}: Δppl {m['dppl_pct']:+.3f}%, {m['bits_per_weight']:.3f} bits/w")
        if m["dppl_pct"] <= max_dppl_pct:
            uniform = {"alpha": a, **m}
            break
    return {
        "format": POLICY_FORMAT, "mode": st["eb_mode"], "codec": st["perturb"],
        "bounds": {str(l): a for l, a in sorted(chosen.items())},
        "max_dppl_pct": max_dppl_pct,
        "meets_budget": measured["dppl_pct"] <= max_dppl_pct,
        "policy": measured,
        "uniform": uniform,
        "study": {"model_path": st["model_path"], "data": st["data"], "max_bytes": st["max_bytes"],
                  "baseline_ppl": doc["baseline"]["ppl"]},
        "planning": log,
    }
