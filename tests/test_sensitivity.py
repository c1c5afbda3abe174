"""Error injection on the shipped tiny MoE: exact restore, real bounds, scopes, bad input."""

import json
import re
from pathlib import Path

import pytest
import torch

from moeoffload import sensitivity
from moeoffload.cli import main
from moeoffload.errors import InvalidArgumentError, InvalidBoundError, NoMoeLayersError


@pytest.fixture(scope="module")
def model():
    m, _ = sensitivity.load_model("default")
    return m


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["gaussian", "szp", "sz3"])
def test_injection_restores_weights_bit_for_bit(model, method):
    grid = sensitivity.ExpertGrid(model)
    before = snapshot(model)
    experts = [(3, 0), (3, 5), (7, 2)]
    with sensitivity.perturbed(grid, experts, sensitivity.Perturbation(method, 0.8)):
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert changed, "nothing was perturbed"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # ... and also when the evaluation inside fails.
    with pytest.raises(RuntimeError):
        with sensitivity.perturbed(grid, experts, sensitivity.Perturbation(method, 0.8)):
            raise RuntimeError("evaluation failed")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("method", ["szp", "sz3"])
@pytest.mark.parametrize("eb_mode", ["meanabs", "abs", "rel"])
def test_real_codec_error_respects_its_bound(model, method, eb_mode):
    grid = sensitivity.ExpertGrid(model)
    alpha = {"meanabs": 0.5, "abs": 2e-3, "rel": 0.01}[eb_mode]
    experts = [(l, 1) for l in range(grid.num_layers)]
    originals = {(l, e, r.name): grid.view(r).clone() for l, e in experts for r in grid.matrices(l, e)}
    pert = sensitivity.Perturbation(method, alpha, eb_mode)
    with sensitivity.perturbed(grid, experts, pert):
        for (l, e, name), orig in originals.items():
            ref = next(r for r in grid.matrices(l, e) if r.name == name)
            err = (grid.view(ref).double() - orig.double()).abs().max().item()
            eb = sensitivity.absolute_bound(orig, alpha, eb_mode)
            assert err <= eb, (l, e, name, err, eb)
            assert err > 0
    assert 0 < pert.max_err_over_eb <= 1.0
    assert 0 < pert.bits_per_weight < 32


def test_gaussian_noise_has_the_papers_scale(model):
    grid = sensitivity.ExpertGrid(model)
    ref = grid.matrices(4, 0)[0]
    orig = grid.view(ref).clone()
    with sensitivity.perturbed(grid, [(4, 0)], sensitivity.Perturbation("gaussian", 0.5, seed=1)):
        noise_std = float((grid.view(ref) - orig).std())
    assert noise_std == pytest.approx(0.5 * float(orig.abs().mean()), rel=0.05)


def test_scopes_and_groups(model):
    grid = sensitivity.ExpertGrid(model)
    L = grid.num_layers
    groups = [grid.group_layers(g) for g in sensitivity.GROUPS]
    assert sum(groups, []) == list(range(L)) and all(groups)
    study = sensitivity.Study(alphas=[0.5], scopes=["expert", "layer", "group", "all"])
    import numpy as np

    usage = np.zeros((L, grid.experts_per_layer))
    usage[:, 3] = 1
    cells = list(study.cells(grid, usage))
    assert [c[1] for c in cells if c[0] == "expert"] == [f"L{l}E3" for l in range(L)]
    assert len([c for c in cells if c[0] == "layer"]) == L
    assert [c[1] for c in cells if c[0] == "group"] == ["shallow", "middle", "deep"]
    assert len(next(c for c in cells if c[0] == "all")[2]) == L * grid.experts_per_layer


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown scope"):
        sensitivity.check_args("szp", [0.1], "meanabs", ["everything"])
    with pytest.raises(InvalidBoundError):
        sensitivity.check_args("szp", [0.0], "meanabs", ["layer"])
    with pytest.raises(InvalidBoundError):
        sensitivity.check_args("szp", [-1.0], "meanabs", ["layer"])
    with pytest.raises(ValueError, match="unknown perturbation"):
        sensitivity.check_args("zfp", [0.1], "meanabs", ["layer"])
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(NoMoeLayersError):
        sensitivity.ExpertGrid(dense)


def test_szpe_perturbs_as_szp_and_counts_its_entropy_coded_bits(model):
    # The study with --perturb szpe measures the same damage as szp (the same values) and reports the
    # bits per weight the table of that coding will have.
    grid = sensitivity.ExpertGrid(model)
    experts = [(l, 2) for l in range(grid.num_layers)]
    seen = {}
    for method in ("szp", "szpe"):
        pert = sensitivity.Perturbation(method, 0.5)
        with sensitivity.perturbed(grid, experts, pert):
            seen[method] = ([grid.view(r).clone() for l, e in experts for r in grid.matrices(l, e)], pert)
    assert all(torch.equal(a, b) for a, b in zip(seen["szp"][0], seen["szpe"][0]))
    assert 0 < seen["szpe"][1].bits_per_weight < 0.8 * seen["szp"][1].bits_per_weight


# ---- resuming a study -------------------------------------------------------------------------

@pytest.fixture
def texts(tmp_path):
    """Two evaluation texts of the same length (so the same number of tokens)."""
    src = Path(sensitivity.__file__).parent
    a, b = tmp_path / "A.txt", tmp_path / "B.txt"
    a.write_bytes((src / "table.py").read_bytes()[:600])
    b.write_bytes((src / "cache.py").read_bytes()[:600])
    return a, b


def small_study(data, **kw):
    return sensitivity.Study(**{"data": str(data), "max_bytes": 600, "alphas": [0.8], "scopes": ["all"], **kw})


def cli_sensitivity(data, out, capsys, *extra):
    code = main(["sensitivity", "--data", str(data), "--max-bytes", "600", "--alpha", "0.8", "--scope", "all",
                 "--no-plots", "--quiet", "--out", str(out), *extra])
    return code, *capsys.readouterr()


def one_line_exit_2(code, stdout, stderr, says):
    assert code == 2 and "Traceback" not in stderr and stdout == "", (code, stdout, stderr)
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("moeoffload") and says in stderr, stderr


def test_a_resumed_study_refuses_cells_measured_on_another_text_seed_or_seq(tmp_path, texts, capsys):
    # It compared only the baseline's token count: text B's study came back with text A's numbers.
    a, b = texts
    out = tmp_path / "st"
    sensitivity.run(small_study(a), out, progress=False)
    before = (out / "results.json").read_bytes()
    for study, says in ((small_study(b), "evaluation text"), (small_study(a, seed=1), "--seed (0 there, 1 now)"),
                        (small_study(a, seq=128), "--seq (256 there, 128 now)")):
        with pytest.raises(InvalidArgumentError, match=re.escape(f"{out / 'results.json'} was measured on another "
                                                                 "study: ") + f".*{re.escape(says)}.*choose another --out"):
            sensitivity.run(study, out, progress=False)
        assert (out / "results.json").read_bytes() == before  # neither discarded nor rewritten
    one_line_exit_2(*cli_sensitivity(b, out, capsys), "evaluation text")
    assert (out / "results.json").read_bytes() == before
    # Other perturbations, alphas and scopes on the same model, text and seed add to the study.
    doc = sensitivity.run(small_study(a, perturb="gaussian", alphas=[0.3], scopes=["layer"]), out, progress=False)
    old = json.loads(before)
    assert doc["cells"][:1] == old["cells"] and len(doc["cells"]) == 1 + doc["model"]["moe_layers"]
    assert doc["baseline"] == old["baseline"]


def test_a_resumed_study_refuses_cells_measured_on_other_weights(tmp_path, texts, monkeypatch):
    out = tmp_path / "st"
    sensitivity.run(small_study(texts[0]), out, progress=False)
    real = sensitivity.load_model

    def tuned(path="default"):  # the same directory, a weight changed (fine-tuned in place)
        m, d = real(path)
        with torch.no_grad():
            next(m.parameters()).view(-1)[0] += 1.0
        return m, d

    monkeypatch.setattr(sensitivity, "load_model", tuned)
    with pytest.raises(InvalidArgumentError, match="model weights differ"):
        sensitivity.run(small_study(texts[0]), out, progress=False)


def test_a_study_that_does_not_record_what_it_was_measured_on_is_refused(tmp_path, texts, capsys):
    # As an older moeoffload wrote it: its cells cannot be checked against this run's model and text.
    a, _ = texts
    out = tmp_path / "st"
    doc = sensitivity.run(small_study(a), out, progress=False)
    doc.pop("measured_on", None)
    (out / "results.json").write_text(json.dumps(doc))
    with pytest.raises(InvalidArgumentError, match="does not record what its baseline and cells were measured on"):
        sensitivity.run(small_study(a), out, progress=False)
    one_line_exit_2(*cli_sensitivity(a, out, capsys), "older moeoffload")
    assert json.loads((out / "results.json").read_text()) == doc


@pytest.mark.parametrize("baseline", [{"tokens": 510}, {"ppl": "x", "acc": 0.5, "tokens": 510},
                                      {"ppl": float("nan"), "acc": 0.5, "tokens": 510},
                                      {"ppl": 3.0, "acc": None, "tokens": 510}, {"ppl": 3.0, "acc": 0.5, "tokens": 0},
                                      {"ppl": 3.0, "acc": 0.5, "tokens": 5.5}])
def test_a_hand_edited_baseline_in_out_is_one_line(tmp_path, texts, capsys, baseline):
    # It was KeyError: 'ppl' or a TypeError from the first cell's delta (or, for tokens, a silent restart).
    out = tmp_path / "st"
    out.mkdir()
    (out / "results.json").write_text(before := json.dumps({"baseline": baseline, "cells": []}))
    one_line_exit_2(*cli_sensitivity(texts[0], out, capsys), "its results.json's baseline lacks ppl, acc or tokens")
    assert (out / "results.json").read_text() == before
