import json
import os
import shutil

import numpy as np
import pytest
import torch

from moeoffload import sensitivity
from moeoffload.cli import main
from moeoffload.errors import InvalidArgumentError, InvalidBoundError
from moeoffload.policy import POLICY_FORMAT, BoundPolicy, choose_bounds


def test_bound_policy_forms(tmp_path):
    assert BoundPolicy.from_any(0.1).bound(7) == 0.1
    p = BoundPolicy.from_any({0: 0.1, "1": 0.2}, "meanabs")
    assert (p.bound(0), p.bound(1), p.mode) == (0.1, 0.2, "meanabs")
    with pytest.raises(InvalidBoundError, match="no bound for MoE layer 2"):
        p.bound(2)
    assert BoundPolicy.from_any(lambda l: 0.1 * (l + 1)).bound(2) == pytest.approx(0.3)
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"format": POLICY_FORMAT, "mode": "meanabs", "bounds": {"0": 0.5, "1": 0.25}}))
    p = BoundPolicy.from_any(f)
    assert (p.mode, p.bound(1)) == ("meanabs", 0.25)
    for bad in (0, -1.0, float("nan"), float("inf"), True, "x"):
        with pytest.raises(InvalidBoundError):
            BoundPolicy.from_any(bad).bound(0)
    with pytest.raises(InvalidBoundError):
        BoundPolicy(mode="sigma")


def test_choose_bounds_known_answer():
    # (bound, damage %, bits): layer 0 tolerates error, layer 1 does not.
    options = {0: [(0.1, 0.1, 6.0), (0.5, 0.3, 4.0), (1.0, 0.6, 3.0)],
               1: [(0.1, 0.2, 6.0), (0.5, 1.5, 4.0), (1.0, 3.0, 3.0)]}
    assert choose_bounds(options, 1.0) == {0: 1.0, 1: 0.1}
    assert choose_bounds(options, 2.0) == {0: 0.5, 1: 0.5}
    assert choose_bounds(options, 0.25) is None  # even the smallest bounds cost 0.3
    assert choose_bounds({0: [(0.1, -0.5, 6.0), (1.0, -0.1, 3.0)]}, 0.01) == {0: 1.0}  # improvements are free


def test_policy_meets_its_budget_on_heldout_text(tmp_path):
    study = sensitivity.Study(perturb="szp", alphas=[0.3, 1.5], scopes=["layer"], max_bytes=1020)
    doc = sensitivity.run(study, tmp_path, progress=False)
    budget = 1.0
    pol = sensitivity.policy_from_study(doc, budget, progress=False)
    assert pol["meets_budget"] and pol["policy"]["dppl_pct"] <= budget
    # Independently re-measured with the bounds it wrote:
    again = sensitivity.measure_bounds(doc, {int(k): v for k, v in pol["bounds"].items()})
    assert again["dppl_pct"] == pytest.approx(pol["policy"]["dppl_pct"], abs=1e-9)
    assert BoundPolicy.from_any(pol).mode == "meanabs"
    if pol["uniform"] is not None:
        assert pol["uniform"]["dppl_pct"] <= budget
        # The per-layer policy may only pick from the same bounds, so it is never larger.
        assert pol["policy"]["bits_per_weight"] <= pol["uniform"]["bits_per_weight"] + 1e-9
    with pytest.raises(ValueError, match="positive"):
        sensitivity.policy_from_study(doc, 0.0, progress=False)


@pytest.mark.parametrize("bound", [np.float64(0.02), np.float32(0.02), torch.tensor(0.02), np.array(0.02)])
def test_numpy_and_tensor_bounds_are_accepted(bound):
    pol = BoundPolicy.from_any({0: bound, 1: 0.02})
    assert pol.bound(0) == pytest.approx(0.02) and type(pol.bound(0)) is float
    assert sensitivity.check_args("szp", [bound], "meanabs", ["layer"]) == [pytest.approx(0.02)]


@pytest.mark.parametrize("bound", [True, torch.tensor([0.1, 0.2]), np.array([0.1]), "0.1", float("nan"), -1])
def test_non_bounds_are_refused(bound):
    with pytest.raises(InvalidBoundError):
        BoundPolicy.from_any({0: bound})
    with pytest.raises(InvalidBoundError):
        sensitivity.check_args("szp", [bound], "meanabs", ["layer"])


@pytest.mark.parametrize("doc,says", [
    ({"bogus": 1}, "MoE layer numbers"), ({"1.5": 0.1}, "MoE layer numbers"), ({"-4": 0.1}, "MoE layer numbers"),
    ({True: 0.1}, "MoE layer numbers"), ({"²": 0.1}, "MoE layer numbers"), ({"format": POLICY_FORMAT}, '"bounds"'),
    ({"format": POLICY_FORMAT, "bounds": [1]}, '"bounds"'), ({"format": POLICY_FORMAT, "bounds": {"x": 0.1}}, "layer"),
    ({"format": POLICY_FORMAT, "mode": 3, "bounds": {"0": 0.1}}, "mode"),
    ({"9" * 5000: 0.1}, "MoE layer numbers"),  # int() refused it with a bare ValueError (4300 digits)
    ({"0": 0.1, "00": 0.2}, "twice"),  # the last one won, silently
])
def test_malformed_policies_are_named(tmp_path, doc, says):
    """A policy document of the wrong shape is InvalidBoundError naming what is wrong (it was KeyError,
    AttributeError or ValueError), as a mapping and as a file."""
    with pytest.raises(InvalidBoundError, match=says):
        BoundPolicy.from_any(doc)
    if not any(isinstance(k, bool) for k in doc):
        (tmp_path / "p.json").write_text(json.dumps(doc))
        with pytest.raises(InvalidBoundError, match=says):
            BoundPolicy.from_any(tmp_path / "p.json")


def test_a_layer_given_twice_in_a_policy_file_is_refused(tmp_path):
    (tmp_path / "p.json").write_text('{"format": "%s", "bounds": {"0": 0.1, "1": 0.3, "0": 0.2}}' % POLICY_FORMAT)
    with pytest.raises(InvalidBoundError, match="twice"):  # json.loads kept the last one
        BoundPolicy.from_any(tmp_path / "p.json")


def test_numpy_integer_layer_keys_are_layers():
    assert BoundPolicy.from_any({np.int64(2): 0.1, np.uint8(0): 0.2}).bound(2) == 0.1


def test_a_policy_file_nested_past_the_parser_is_named(tmp_path):
    (tmp_path / "deep.json").write_text("[" * 100_000)
    with pytest.raises(InvalidBoundError, match="cannot read the bound policy"):
        BoundPolicy.from_any(tmp_path / "deep.json")


# ---- policy from a study that is not as policy_from_study expects ---------------------------------

def small_study(**kw):
    return sensitivity.Study(**{"perturb": "szp", "alphas": [0.3], "scopes": ["layer"], "max_bytes": 600, **kw})


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    sensitivity.run(small_study(), out, progress=False)
    return out


@pytest.fixture(scope="module")
def mixed_dir(study_dir, tmp_path_factory):
    """The same study with Gaussian cells added, then resumed with szp (so szp is the study's perturbation)."""
    out = tmp_path_factory.mktemp("mixed") / "study"
    shutil.copytree(study_dir, out)
    sensitivity.run(small_study(perturb="gaussian"), out, progress=False)
    sensitivity.run(small_study(), out, progress=False)
    return out


def cli_policy(capsys, study, out, budget="1%"):
    code = main(["policy", "--from", str(study), "--max-dppl", budget, "--out", str(out), "--quiet"])
    return code, *capsys.readouterr()


def one_line_exit_2(code, stdout, stderr, says):
    assert code == 2 and "Traceback" not in stderr and stdout == "", (code, stdout, stderr)
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("moeoffload") and says in stderr, stderr


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link"])
def test_policy_out_that_is_the_study_itself_is_refused(study_dir, tmp_path, capsys, how):
    # It wrote the policy over the study, exit 0.
    study = tmp_path / "results.json"
    shutil.copy(study_dir / "results.json", study)
    before = study.read_bytes()
    out = study if how == "same path" else tmp_path / "policy.json"
    if how == "symlink":
        out.symlink_to(study)
    elif how == "hard link":
        os.link(study, out)
    one_line_exit_2(*cli_policy(capsys, study, out), "would overwrite the study")
    assert study.read_bytes() == before


def test_policy_uses_only_the_studys_own_perturbation(mixed_dir, tmp_path, capsys):
    # Gaussian cells (no bits) beside szp's: TypeError in choose_bounds; their bounds are no szp bounds either.
    doc = json.loads((mixed_dir / "results.json").read_text())
    assert {c["method"] for c in doc["cells"]} == {"gaussian", "szp"}
    pol = sensitivity.policy_from_study(doc, 1.0, progress=False)
    assert pol["codec"] == "szp" and pol["policy"]["bits_per_weight"] > 0
    # None of the study's own cells left: said so, from the API and in one line from the command line.
    for edit in ({"method": "gaussian"}, {"eb_mode": "abs"}):
        bad = json.loads(json.dumps(doc))
        bad["cells"] = [{**c, **edit} for c in bad["cells"]]
        with pytest.raises(InvalidArgumentError, match="none of the study's 20 cells was measured with its "
                                                       "perturbation szp at eb-mode meanabs"):
            sensitivity.policy_from_study(bad, 1.0, progress=False)
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        one_line_exit_2(*cli_policy(capsys, tmp_path / "bad.json", tmp_path / "p.json"), "none of the study's")
        assert not (tmp_path / "p.json").exists()


def test_policy_checks_the_studys_moe_layers(study_dir, tmp_path, capsys):
    # A results.json saying 3 MoE layers (the model has 10) gave a 3-layer policy, exit 0.
    doc = json.loads((study_dir / "results.json").read_text())
    doc["model"]["moe_layers"] = 3
    with pytest.raises(InvalidArgumentError, match=r"cells for MoE layers \[3, 4, 5, 6, 7, 8, 9\]"):
        sensitivity.policy_from_study(doc, 1.0, progress=False)
    doc["cells"] = [c for c in doc["cells"] if c["layers"][0] < 3]  # consistent with itself, not with the model
    with pytest.raises(InvalidArgumentError, match="model.moe_layers 3, but its model default has 10 MoE layers"):
        sensitivity.policy_from_study(doc, 1.0, progress=False)
    (tmp_path / "three.json").write_text(json.dumps(doc))
    one_line_exit_2(*cli_policy(capsys, tmp_path / "three.json", tmp_path / "p.json"),
                    "model.moe_layers says 3, but the study's model default has 10 MoE layers")
    assert not (tmp_path / "p.json").exists()


def test_policy_refuses_codec_cells_without_bits(study_dir):
    doc = json.loads((study_dir / "results.json").read_text())
    doc["cells"][4]["bits_per_weight"] = None
    with pytest.raises(InvalidArgumentError, match="lack bits_per_weight"):
        sensitivity.policy_from_study(doc, 1.0, progress=False)
