"""The command line end to end on the shipped model, at small settings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import moeoffload


def cli(*args, check=True):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(moeoffload.__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "moeoffload.cli", *args], capture_output=True, text=True, env=env,
                          check=check, timeout=300)


def test_sensitivity_then_policy_end_to_end(tmp_path):
    out = tmp_path / "study"
    r = cli("sensitivity", "--perturb", "szp", "--alpha", "0.3,1.5", "--scope", "layer,group", "--max-bytes", "510",
            "--out", str(out), "--quiet")
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["cells"]) == 10 * 2 + 3 * 2
    assert all(c["max_err_over_eb"] <= 1.0 and c["bits_per_weight"] > 0 for c in doc["cells"])
    for name in ("results.csv", "heatmap-layer-szp.png", "lines-layer.png", "lines-group.png"):
        assert (out / name).stat().st_size > 0, name
    assert "baseline: ppl" in r.stdout

    # Resumable: a rerun recomputes nothing.
    again = cli("sensitivity", "--perturb", "szp", "--alpha", "0.3,1.5", "--scope", "layer,group", "--max-bytes", "510",
                "--out", str(out), "--quiet", "--no-plots")
    assert json.loads((out / "results.json").read_text())["cells"] == doc["cells"]
    assert again.returncode == 0

    p = cli("policy", "--from", str(out / "results.json"), "--max-dppl", "2%", "--out", str(tmp_path / "policy.json"),
            "--quiet")
    pol = json.loads((tmp_path / "policy.json").read_text())
    assert pol["meets_budget"] and pol["policy"]["dppl_pct"] <= 2.0 and len(pol["bounds"]) == 10
    assert "per-layer policy" in p.stdout


def test_bad_arguments_give_clear_errors(tmp_path):
    r = cli("sensitivity", "--scope", "everything", "--out", str(tmp_path), check=False)
    assert r.returncode == 2 and "unknown scope" in r.stderr
    r = cli("sensitivity", "--alpha", "0", "--out", str(tmp_path), check=False)
    assert r.returncode == 2 and "alpha must be a positive" in r.stderr
    r = cli("sensitivity", "--perturb", "zfp", "--out", str(tmp_path), check=False)
    assert r.returncode == 2 and "unknown perturbation" in r.stderr
    r = cli("policy", "--from", str(tmp_path / "missing.json"), "--max-dppl", "1%", check=False)
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_demo_runs_on_the_default_model():
    r = cli("demo", "--max-bytes", "510", "--sequences", "8", "--repeats", "1")
    assert "Perplexity" in r.stdout and "belady" in r.stdout and "BOUND VIOLATED" not in r.stderr


def test_run_generates_with_raw_experts_identical_to_the_dense_model():
    r = cli("run", "--codec", "none", "--max-new-tokens", "12", "--budget", "25%", "--compare")
    assert "tokens identical" in r.stdout
    assert "decode" in r.stdout and "hit rate" in r.stdout


def test_run_with_szp_reports_the_fused_layers():
    r = cli("run", "--max-new-tokens", "8", "--budget", "1MiB", "--prompt", "import os\n", "--prefetch", "activation")
    assert "10 of 10 MoE layers fused" in r.stdout and "prefetch activation" in r.stdout


def test_compress_then_run_from_the_table(tmp_path):
    r = cli("compress", "--model", "default", "--error-bound", "0.5", "--out", str(tmp_path / "t"), "--quiet")
    assert "10 MoE layers x 8 experts" in r.stdout and (tmp_path / "t" / "manifest.json").exists()
    r = cli("run", "--table", str(tmp_path / "t"), "--max-new-tokens", "6", "--prompt", "x = ")
    assert "dense experts never loaded" in r.stdout and "stalled" in r.stdout
    again = cli("compress", "--out", str(tmp_path / "t"), check=False)
    assert again.returncode == 2 and "already" in again.stderr and "Traceback" not in again.stderr


def test_compress_szpe_is_smaller_and_runs_fused(tmp_path):
    bits = {}
    for codec in ("szp", "szpe"):
        r = cli("compress", "--model", "default", "--error-bound", "0.5", "--codec", codec,
                "--out", str(tmp_path / codec), "--quiet")
        bits[codec] = float(r.stdout.split(" bits/weight")[0].split()[-1])
    assert bits["szpe"] < 0.8 * bits["szp"]
    r = cli("run", "--table", str(tmp_path / "szpe"), "--max-new-tokens", "6", "--prompt", "x = ", "--budget", "10%")
    assert "experts: szpe" in r.stdout and "10 of 10 MoE layers fused" in r.stdout


def test_a_reader_that_goes_away_ends_the_command_quietly_buffered_or_not():
    # With PYTHONUNBUFFERED=1 nothing was left to flush, so the closed pipe was not seen: a BrokenPipeError traceback
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(moeoffload.__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    for unbuffered in ("", "1"):
        env["PYTHONUNBUFFERED"] = unbuffered
        p = subprocess.Popen([sys.executable, "-m", "moeoffload.cli", "run", "--max-new-tokens", "20"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        p.stdout.read(5)
        p.stdout.close()
        err = p.stderr.read().decode()
        assert p.wait(timeout=300) == 141, err
        assert "Traceback" not in err, err


def test_a_full_disk_under_stdout_is_one_line():
    r = subprocess.run(f"{sys.executable} -m moeoffload.cli info > /dev/full", shell=True, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == ["moeoffload: error: [Errno 28] No space left on device"]
