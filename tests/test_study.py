"""The results study runner (python -m kdlab.study): its commands, bad input, and a small real study."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kdlab import study
from kdlab.errors import ConfigError
from tests.conftest import ROOT, kdlab_env


def run_study(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdlab.study", *args], cwd=ROOT, env=kdlab_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_dry_run_lists_kdlab_multiruns_with_seeds_and_overrides():
    r = run_study("fashion_mnist", "--dry-run", "--seeds", "0,5", "--", "trainer.max_epochs=1")
    assert r.returncode == 0, r.stderr
    cmds = [line for line in r.stdout.splitlines() if line.startswith("python -m kdlab ")]
    cfg = study.load_study("fashion_mnist")
    assert len(cmds) == len(cfg["sweeps"])
    for cmd, sw in zip(cmds, cfg["sweeps"]):
        assert cmd.startswith("python -m kdlab -m +experiment=" + ",".join(sw["experiments"]) + " seed=0,5")
        assert cmd.endswith("logger=csv trainer.max_epochs=1")
    # every row of the study: alone, KD, TAKD, DGKD, sDGKD; pacemaker + direct KD; FEED + logit KD
    exps = {e for sw in cfg["sweeps"] for e in sw["experiments"]}
    assert {"baseline_fashion_mnist", "kd_fashion_mnist", "takd_fashion_mnist", "dgkd_fashion_mnist",
            "sdgkd_fashion_mnist", "pacemaker_fashion_mnist", "otf_kd_fashion_mnist",
            "feed_parallel_fashion_mnist", "feed_logitkd_fashion_mnist"} <= exps
    assert cfg["seeds"] == [0, 1, 2]


@pytest.mark.parametrize("args, message", [
    (["nope"], "unknown study 'nope'; known: fashion_mnist"),
    (["--only", "plain", "--dry-run"], "--only names unknown part 'plain'; parts of study fashion_mnist: "),
    (["--seeds", "a,b", "--dry-run"], "--seeds must be comma-separated integers, got 'a,b'"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    r = run_study(*args)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and message in r.stderr


def test_a_study_naming_an_unknown_experiment_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sweeps:\n  - {part: x, experiments: [dgkd_fashion_mnit]}\n")
    with pytest.raises(ConfigError, match="unknown experiment 'dgkd_fashion_mnit'; known: .*dgkd_fashion_mnist"):
        study.load_study(str(bad))


def test_readme_block_is_replaced_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{study.BEGIN}\nold table\n{study.END}\nafter\n")
    study.update_readme("| new |\n", readme)
    assert readme.read_text() == f"# x\n\nbefore\n{study.BEGIN}\n| new |\n{study.END}\nafter\n"
    readme.write_text("no markers\n")
    with pytest.raises(ConfigError, match="no <!-- results:begin -->"):
        study.update_readme("| new |\n", readme)


def test_small_study_end_to_end_with_a_failing_sweep(tmp_path):
    """Two parts on synthetic data, two seeds: the good part's tables are written from its run directories
    and the failing sweep is recorded; the study exits 1."""
    spec = tmp_path / "tiny.yaml"
    spec.write_text(
        "seeds: [0, 1]\nby: experiment\nlast_k: 2\noverrides: [logger=csv]\n"
        "parts:\n  chain: {title: 'Tiny chain', note: 'synthetic'}\n  broken: {title: 'Broken'}\n"
        "sweeps:\n"
        "  - {part: chain, experiments: [dgkd_synthetic_test], overrides: ['pipeline.chain=[plain4,plain2]', distill.stochastic.mode=none]}\n"
        "  - {part: broken, experiments: [dgkd_synthetic_test], overrides: [distill.temperature=-1]}\n")
    out = tmp_path / "results"
    r = run_study(str(spec), "--root", str(tmp_path / "root"), "--out", str(out), "--no-plots", "--",
                  "data.n_train=320", "data.n_test=100", "trainer.max_epochs=1", f"paths.output_dir={tmp_path}")
    assert r.returncode == 1, r.stdout + r.stderr
    rec = json.loads((out / "study.json").read_text())
    assert [s["exit_code"] for s in rec["sweeps"]] == [0, 2]
    md = (out / "results.md").read_text()
    assert "#### Tiny chain" in md and "Broken" not in md
    row = next(line for line in md.splitlines() if line.startswith("| dgkd_synthetic_test"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2"  # two seeds, both completed
    assert cells[-1] == ("`python -m kdlab -m +experiment=dgkd_synthetic_test seed=0,1 'pipeline.chain=[plain4,plain2]' distill.stochastic.mode=none "
                         f"logger=csv data.n_train=320 data.n_test=100 trainer.max_epochs=1 paths.output_dir={tmp_path}`")
    # the table's numbers are compare's numbers from the run directories
    csv_rows = (out / "chain" / "comparison.csv").read_text().splitlines()
    assert len(csv_rows) == 2 and csv_rows[1].startswith("experiment=dgkd_synthetic_test,dgkd_synthetic_test,2,0")
    results = sorted((tmp_path / "root" / "01-chain").rglob("results.json"))
    accs = [json.loads(p.read_text())["stages"][-1]["test_acc"] for p in results]
    assert len(accs) == 2 and f"{100 * sum(accs) / 2:.2f} ±" in cells[2]
    assert (out / "chain" / "comparison.html").is_file() and not (out / "broken").exists()
    # --tables-only rebuilds the same tables from the run directories, training nothing
    r = run_study(str(spec), "--tables-only", "--root", str(tmp_path / "root"), "--out", str(tmp_path / "again"),
                  "--no-plots")
    assert r.returncode == 1 and "training" not in r.stdout, r.stdout + r.stderr  # 1: a sweep had failed
    assert (tmp_path / "again" / "results.md").read_text() == md
