"""Error injection on the shipped tiny MoE: exact restore, real bounds, scopes, bad input."""

import pytest
import torch

from moeoffload import sensitivity
from moeoffload.errors import InvalidBoundError, NoMoeLayersError


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
