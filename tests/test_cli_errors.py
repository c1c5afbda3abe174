"""Every user mistake on the command line ends in one line on stderr and exit status 2, never a traceback,
and is found before any computation starts.

All cases run through moeoffload.cli.main() in one fresh interpreter (a driver script in a subprocess: torch
is imported once), and a few also through `python -m moeoffload.cli` itself.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import moeoffload

PYTHONPATH = str(Path(moeoffload.__file__).resolve().parents[1])

DRIVER = textwrap.dedent("""
    import contextlib, io, json, sys, traceback
    from moeoffload.cli import main

    cases, report = json.loads(open(sys.argv[1]).read()), {}
    for name, argv in cases.items():
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code
            except BaseException:
                traceback.print_exc()
                code = "uncaught"
        report[name] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
    open(sys.argv[2], "w").write(json.dumps(report))
""")

STUDY = {"study": {"model_path": "default", "data": "default", "perturb": "szp", "eb_mode": "meanabs",
                   "max_bytes": 510, "seq": 256, "seed": 0},
         "model": {"moe_layers": 10}, "baseline": {"ppl": 3.0}, "cells": []}

# name -> (argv, what the one line must say); {t} is a scratch directory with the files made below.
CASES = {
    # --model
    "model-missing": (["sensitivity", "--model", "{t}/nowhere", "--out", "{t}/o"], "--model"),
    "model-is-a-file": (["sensitivity", "--model", "{t}/afile", "--out", "{t}/o"], "--model"),
    "model-no-config": (["sensitivity", "--model", "{t}/empty", "--out", "{t}/o"], "config.json"),
    "model-bad-config": (["sensitivity", "--model", "{t}/badcfg", "--out", "{t}/o"], "--model"),
    "model-no-weights": (["sensitivity", "--model", "{t}/noweights", "--out", "{t}/o"], "weights"),
    "model-dense": (["sensitivity", "--model", "{t}/dense", "--out", "{t}/o"], "Mixture-of-Experts"),
    # --data
    "data-missing": (["sensitivity", "--data", "{t}/nowhere.txt", "--out", "{t}/o"], "--data"),
    "data-is-a-dir": (["sensitivity", "--data", "{t}/empty", "--out", "{t}/o"], "--data"),
    "data-too-short": (["sensitivity", "--data", "{t}/afile", "--out", "{t}/o"], "--seq"),
    # numbers
    "seq-zero": (["sensitivity", "--seq", "0", "--out", "{t}/o"], "--seq"),
    "seq-negative": (["sensitivity", "--seq", "-3", "--out", "{t}/o"], "--seq"),
    "seq-nan": (["sensitivity", "--seq", "nan", "--out", "{t}/o"], "--seq"),
    "seq-one-after-bos": (["sensitivity", "--seq", "1", "--out", "{t}/o", "--no-plots"], "--seq 1"),
    "seq-beyond-the-model": (["sensitivity", "--seq", "100000", "--out", "{t}/o"], "--seq"),
    "seq-beyond-the-text": (["sensitivity", "--seq", "1000", "--max-bytes", "300", "--out", "{t}/o"], "--seq"),
    "max-bytes-zero": (["sensitivity", "--max-bytes", "0", "--out", "{t}/o"], "--max-bytes"),
    "max-bytes-negative": (["sensitivity", "--max-bytes", "-5", "--out", "{t}/o"], "--max-bytes"),
    "max-bytes-nan": (["sensitivity", "--max-bytes", "nan", "--out", "{t}/o"], "--max-bytes"),
    "alpha-zero": (["sensitivity", "--alpha", "0", "--out", "{t}/o"], "alpha must be a positive"),
    "alpha-negative": (["sensitivity", "--alpha", "0.3,-1", "--out", "{t}/o"], "alpha"),
    "alpha-nan": (["sensitivity", "--alpha", "nan", "--out", "{t}/o"], "alpha"),
    "alpha-inf": (["sensitivity", "--alpha", "inf", "--out", "{t}/o"], "alpha"),
    "alpha-empty-list": (["sensitivity", "--alpha", ",", "--out", "{t}/o"], "--alpha"),
    "alpha-words": (["sensitivity", "--alpha", "small", "--out", "{t}/o"], "--alpha"),
    "scope-empty-list": (["sensitivity", "--scope", ",", "--out", "{t}/o"], "--scope"),
    "scope-unknown": (["sensitivity", "--scope", "layer,everything", "--out", "{t}/o"], "unknown scope"),
    "perturb-unknown": (["sensitivity", "--perturb", "zfp", "--out", "{t}/o"], "unknown perturbation"),
    "eb-mode-unknown": (["sensitivity", "--eb-mode", "relative", "--out", "{t}/o"], "--eb-mode"),
    "seed-negative": (["sensitivity", "--seed", "-1", "--out", "{t}/o"], "--seed"),
    "task-limit-zero": (["sensitivity", "--task-limit", "0", "--out", "{t}/o"], "--task-limit"),
    "demo-alpha-zero": (["demo", "--alpha", "0"], "--alpha"),
    # compress
    "compress-no-out": (["compress"], "--out"),
    "compress-model-missing": (["compress", "--model", "{t}/nowhere", "--out", "{t}/tab"], "--model"),
    "compress-policy-missing": (["compress", "--policy", "{t}/nowhere.json", "--out", "{t}/tab"], "--policy"),
    "compress-bound-zero": (["compress", "--error-bound", "0", "--out", "{t}/tab"], "--error-bound"),
    "compress-out-is-a-file": (["compress", "--out", "{t}/afile"], "--out"),
    "compress-out-not-empty": (["compress", "--out", "{t}/notempty"], "not empty (it holds keep.txt)"),
    "compress-out-empty": (["compress", "--out", ""], "--out: empty"),  # (an unset $VAR) not the current directory
    "compress-policy-not-a-policy": (["compress", "--policy", "{t}/bogus-policy.json", "--out", "{t}/tab"],
                                     "MoE layer numbers"),
    "compress-policy-without-bounds": (["compress", "--policy", "{t}/no-bounds.json", "--out", "{t}/tab"],
                                       '"bounds"'),
    "compress-policy-nested-deep": (["compress", "--policy", "{t}/deep.json", "--out", "{t}/tab"],
                                    "cannot read the bound policy"),
    "compress-both-bounds": (["compress", "--error-bound", "0.3", "--policy", "{t}/afile", "--out", "{t}/tab"],
                             "not allowed"),
    # run
    "run-table-missing": (["run", "--table", "{t}/nowhere"], "--table"),
    "run-table-empty": (["run", "--table", ""], "--table: empty"),
    "run-table-of-another-layout": (["run", "--table", "{t}/unfused", "--max-new-tokens", "2"], "does not fit"),
    "run-beyond-the-context": (["run", "--max-new-tokens", "5000"], "context"),
    "run-model-missing": (["run", "--model", "{t}/nowhere"], "--model"),
    "run-model-dense": (["run", "--model", "{t}/dense"], "Mixture-of-Experts"),
    "run-budget-zero-share": (["run", "--budget", "0%"], "--budget"),
    "run-budget-words": (["run", "--budget", "lots"], "--budget"),
    "run-budget-too-large": (["run", "--budget", "1e30"], "--budget"),
    "run-error-bound-words": (["run", "--error-bound", "tight"], "--error-bound"),
    "run-error-bound-negative": (["run", "--error-bound", "-1"], "--error-bound"),
    "run-max-new-tokens-zero": (["run", "--max-new-tokens", "0"], "--max-new-tokens"),
    "run-codec-unknown": (["run", "--codec", "zip"], "--codec"),
    "run-table-and-codec": (["run", "--table", "{t}/empty", "--codec", "none"], "--codec with --table"),
    "run-table-and-bound": (["run", "--table", "{t}/empty", "--error-bound", "0.3"], "--error-bound with --table"),
    "run-error-bound-not-a-policy": (["run", "--error-bound", "{t}/bogus-policy.json"], "MoE layer numbers"),
    "run-prefetch-unknown": (["run", "--prefetch", "psychic"], "--prefetch"),
    "demo-alpha-nan": (["demo", "--alpha", "nan"], "--alpha"),
    "demo-alpha-empty": (["demo", "--alpha", ","], "--alpha"),
    "demo-max-bytes-zero": (["demo", "--max-bytes", "0"], "--max-bytes"),
    "demo-max-bytes-too-few": (["demo", "--max-bytes", "100"], "--max-bytes"),
    "demo-repeats-zero": (["demo", "--repeats", "0"], "--repeats"),
    "demo-repeats-negative": (["demo", "--repeats", "-2"], "--repeats"),
    "demo-sequences-zero": (["demo", "--sequences", "0"], "--sequences"),
    "demo-sequences-nan": (["demo", "--sequences", "nan"], "--sequences"),
    # --out
    "out-under-a-file": (["sensitivity", "--out", "{t}/afile/study"], "--out"),
    "out-is-a-file": (["sensitivity", "--out", "{t}/afile"], "--out"),
    "out-holds-a-broken-results-json": (["sensitivity", "--out", "{t}/broken_out"], "results.json"),
    # policy
    "policy-from-missing": (["policy", "--from", "{t}/nowhere.json", "--max-dppl", "1%"], "cannot read"),
    "policy-from-dir": (["policy", "--from", "{t}/empty", "--max-dppl", "1%"], "cannot read"),
    "policy-from-not-json": (["policy", "--from", "{t}/afile", "--max-dppl", "1%"], "cannot read"),
    "policy-from-a-list": (["policy", "--from", "{t}/list.json", "--max-dppl", "1%"], "--from"),
    "policy-from-another-json": (["policy", "--from", "{t}/other.json", "--max-dppl", "1%"], "--from"),
    "policy-study-model-gone": (["policy", "--from", "{t}/study-gone.json", "--max-dppl", "1%",
                                 "--out", "{t}/p.json"], "model"),
    "policy-out-under-a-file": (["policy", "--from", "{t}/study.json", "--max-dppl", "1%",
                                 "--out", "{t}/afile/p.json"], "--out"),
    "policy-out-is-a-dir": (["policy", "--from", "{t}/study.json", "--max-dppl", "1%", "--out", "{t}/empty"],
                            "--out"),
    "policy-no-layer-cells": (["policy", "--from", "{t}/study.json", "--max-dppl", "1%", "--out", "{t}/p.json"],
                              "layer"),
    "policy-max-dppl-zero": (["policy", "--from", "{t}/study.json", "--max-dppl", "0%"], "--max-dppl"),
    "policy-max-dppl-nan": (["policy", "--from", "{t}/study.json", "--max-dppl", "nan"], "--max-dppl"),
    "policy-max-dppl-words": (["policy", "--from", "{t}/study.json", "--max-dppl", "some"], "--max-dppl"),
    "policy-no-from": (["policy", "--max-dppl", "1%"], "--from"),
    # the command itself
    "no-command": ([], "command"),
    "unknown-command": (["frobnicate"], "frobnicate"),
}
if importlib.util.find_spec("lm_eval") is None:
    CASES["tasks-without-lm-eval"] = (["sensitivity", "--tasks", "hellaswag", "--out", "{t}/o"], "lm-eval")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    from transformers import MistralConfig, MistralForCausalLM

    t = tmp_path_factory.mktemp("cli")
    (t / "afile").write_text("a few bytes of text\n")
    (t / "empty").mkdir()
    (t / "notempty").mkdir()
    (t / "notempty" / "keep.txt").write_text("the user's\n")
    (t / "badcfg").mkdir()
    (t / "badcfg" / "config.json").write_text("{")
    (t / "badcfg" / "model.safetensors").write_bytes(b"")
    (t / "noweights").mkdir()
    (t / "noweights" / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    dense = MistralConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512)
    MistralForCausalLM(dense).save_pretrained(t / "dense")
    (t / "broken_out").mkdir()
    (t / "broken_out" / "results.json").write_text("[1, 2")
    (t / "list.json").write_text("[]")
    (t / "bogus-policy.json").write_text(json.dumps({"bogus": 1}))
    (t / "no-bounds.json").write_text(json.dumps({"format": "moeoffload-bound-policy"}))
    (t / "deep.json").write_text("[" * 100_000)
    (t / "other.json").write_text(json.dumps({"format": "moeoffload-bound-policy", "bounds": {}}))
    (t / "study.json").write_text(json.dumps(STUDY))
    from moeoffload import table
    from moeoffload.models import tiny_moe

    # the shipped model's table as table.build makes it by default: w1/w2/w3, not the gate_up_proj it runs
    table.build(tiny_moe.DEFAULT_DIR, 0.3, mode="meanabs", progress=False, out=t / "unfused").close()
    gone = json.loads(json.dumps(STUDY))
    gone["study"]["model_path"] = str(t / "deleted-model")
    (t / "study-gone.json").write_text(json.dumps(gone))
    return t


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = PYTHONPATH + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"  # a path taken for a hub id must not reach the network
    return env


def _argv(argv, t: Path) -> list[str]:
    return [a.replace("{t}", str(t)) for a in argv]


@pytest.fixture(scope="module")
def report(scratch) -> dict:
    cases = {name: _argv(argv, scratch) for name, (argv, _) in CASES.items()}
    (scratch / "cases.json").write_text(json.dumps(cases))
    (scratch / "driver.py").write_text(DRIVER)
    subprocess.run([sys.executable, str(scratch / "driver.py"), str(scratch / "cases.json"), str(scratch / "report.json")],
                   env=_env(), check=True, timeout=600, capture_output=True, cwd=scratch)
    return json.loads((scratch / "report.json").read_text())


def check_one_line(code, stdout: str, stderr: str, says: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert code == 2, (code, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("moeoffload"), lines[0]
    assert says in lines[0], lines[0]
    assert stdout == "", stdout  # nothing ran: no progress, no results


@pytest.mark.parametrize("name", list(CASES))
def test_user_mistake_is_one_line_and_exit_2(report, name):
    r = report[name]
    check_one_line(r["code"], r["stdout"], r["stderr"], CASES[name][1])


def test_nothing_was_computed_or_written(report, scratch):
    assert not (scratch / "o").exists()  # every sensitivity mistake above was found before --out was made
    assert not (scratch / "p.json").exists()
    assert not (scratch / "tab").exists()  # nor --out of a compress whose policy was malformed
    assert not (scratch / "manifest.json").exists()  # nor the current directory for an empty --out
    assert (scratch / "broken_out" / "results.json").read_text() == "[1, 2"
    assert sorted(p.name for p in (scratch / "notempty").iterdir()) == ["keep.txt"]


def test_compress_into_a_directory_another_compress_holds_is_refused(tmp_path):
    # Two compresses into one --out wrote one experts.safetensors.tmp: one said done, the table did not load.
    import fcntl

    out = tmp_path / "t"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a compress writing there holds it
    try:
        r = subprocess.run([sys.executable, "-m", "moeoffload.cli", "compress", "--out", str(out), "--quiet"],
                           capture_output=True, text=True, env=_env(), timeout=300)
    finally:
        os.close(fd)
    check_one_line(r.returncode, r.stdout, r.stderr, "another moeoffload compress is writing there")
    assert list(out.iterdir()) == []


def test_a_failed_compress_leaves_what_others_wrote_beside_it(tmp_path, monkeypatch):
    # It removed the top-most directory it had made, whole: a table another compress finished in it too
    from moeoffload import table
    from moeoffload.cli import main

    def build(*args, out, **kw):
        (out / "experts.safetensors.tmp").write_bytes(b"half")
        (out.parent / "b").mkdir()  # another compress's finished table, made meanwhile
        (out.parent / "b" / "manifest.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(table, "build", build)
    assert main(["compress", "--out", str(tmp_path / "tables" / "a"), "--quiet"]) == 130
    assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == ["b"]
    assert (tmp_path / "tables" / "b" / "manifest.json").exists()


def test_compress_under_nohup_outlives_a_hangup(tmp_path):
    # An ignored SIGHUP (nohup) stays ignored: the clean-up handler is for signals that would kill
    import signal
    import time

    out = tmp_path / "t"
    p = subprocess.Popen([sys.executable, "-m", "moeoffload.cli", "compress", "--out", str(out), "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
                         preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    deadline = time.time() + 120
    while not (out / "experts.safetensors.tmp").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    p.send_signal(signal.SIGHUP)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert (out / "manifest.json").exists()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_compress_ended_by_a_signal_leaves_nothing(tmp_path, sig):
    import signal
    import time

    out = tmp_path / "a" / "t"
    p = subprocess.Popen([sys.executable, "-m", "moeoffload.cli", "compress", "--out", str(out), "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    deadline = time.time() + 120
    while not (out / "experts.safetensors.tmp").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + getattr(signal, sig), err
    assert "Traceback" not in err.decode(), err
    assert not (tmp_path / "a").exists()  # the parent it made goes too


@pytest.mark.parametrize("name", ["model-dense", "out-under-a-file", "seq-zero", "policy-out-under-a-file",
                                  "demo-max-bytes-too-few", "alpha-empty-list"])
def test_through_python_m(scratch, name):
    argv, says = CASES[name]
    r = subprocess.run([sys.executable, "-m", "moeoffload.cli", *_argv(argv, scratch)], capture_output=True, text=True,
                       env=_env(), timeout=300)
    check_one_line(r.returncode, r.stdout, r.stderr, says)


def test_a_missing_extra_is_one_line_naming_the_pip_install(monkeypatch):
    import importlib.util

    from moeoffload import MissingExtraError
    from moeoffload.extras import require

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(MissingExtraError, match=r"^the plots need matplotlib, which is not installed: "
                                                r"pip install 'moeoffload\[study\]'$"):
        require("matplotlib", "the plots")
