"""The results study runner (python -m kdlab.study): its commands, bad input, and a small real study."""
from __future__ import annotations

import json

import pytest

from kdlab.compare import runs as compare_runs
from kdlab.errors import ConfigError
from kdlab.study import config as study_config
from kdlab.study import tables as study_tables
from tests.helpers.cli import run_study


def test_dry_run_lists_kdlab_multiruns_with_seeds_and_overrides():
    r = run_study("fashion_mnist", "--dry-run", "--seeds", "0,5", "--jobs", "1", "--", "trainer.max_epochs=1")
    assert r.returncode == 0, r.stderr
    cmds = [line for line in r.stdout.splitlines() if line.startswith("python -m kdlab ")]
    cfg = study_config.load_study("fashion_mnist")
    assert len(cmds) == len(cfg["sweeps"])
    for cmd, sw in zip(cmds, cfg["sweeps"]):
        assert cmd.startswith("python -m kdlab -m +experiment=" + ",".join(sw["experiments"]) + " seed=0,5")
        assert cmd.endswith("logger=csv trainer.max_epochs=1")  # --jobs 1: the basic launcher, one at a time
    # every row of the study: alone, KD, TAKD, DGKD, sDGKD; pacemaker + direct KD; FEED + logit KD
    exps = {e for sw in cfg["sweeps"] for e in sw["experiments"]}
    assert {"baseline_fashion_mnist", "kd_fashion_mnist", "takd_fashion_mnist", "dgkd_fashion_mnist",
            "sdgkd_fashion_mnist", "pacemaker_fashion_mnist", "otf_kd_fashion_mnist",
            "feed_parallel_fashion_mnist", "feed_logitkd_fashion_mnist"} <= exps
    assert cfg["seeds"] == [0, 1, 2]


@pytest.mark.slow  # a long CLI run: in make test-slow (CI runs both)
def test_sweeps_run_as_many_jobs_at_a_time_as_the_machine_allows():
    """Default: one job per core (no GPU here; at most 8) under joblib, sized by kdlab, and the study says so;
    --jobs chooses; a launcher after -- is the user's and kdlab adds none."""
    from kdlab.cli.resources import MAX_CPU_JOBS, usable_cores

    jobs = min(usable_cores(), MAX_CPU_JOBS)
    r = run_study("fashion_mnist", "--dry-run", "--only", "feed")
    assert r.returncode == 0, r.stderr
    cmd = next(line for line in r.stdout.splitlines() if line.startswith("python -m kdlab "))
    if jobs > 1:
        assert cmd.endswith(f"logger=csv hydra/launcher=joblib hydra.launcher.n_jobs={jobs}")
    assert f"; {jobs} job(s) at a time, {max(1, usable_cores() // jobs)} thread(s) each; runs under" in r.stdout
    r = run_study("fashion_mnist", "--dry-run", "--only", "feed", "--jobs", "3")
    assert "hydra/launcher=joblib hydra.launcher.n_jobs=3" in r.stdout
    r = run_study("fashion_mnist", "--dry-run", "--only", "feed", "--", "hydra/launcher=submitit_local")
    cmd = next(line for line in r.stdout.splitlines() if line.startswith("python -m kdlab "))
    assert cmd.endswith("logger=csv hydra/launcher=submitit_local") and "joblib" not in cmd
    assert "the launcher given after --" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--jobs", "0", "--dry-run"], "jobs at a time must be a positive integer, got 0"),
    (["nope"], "unknown study 'nope'; known: " + ", ".join(study_config.known_studies())),
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
        study_config.load_study(str(bad))


def test_a_sweep_renaming_its_experiment_gets_its_command_and_place_in_the_table():
    """The library part runs one recipe under many experiment_name= overrides: each row is one of them."""
    assert study_config.row_name(["distill=dkd", "experiment_name=lib_dkd"], "library_fashion_mnist") == "lib_dkd"
    assert study_config.row_name(["distill=dkd"], "library_fashion_mnist") == "library_fashion_mnist"
    # a study's own part (conf/experiment/<study>/) is named by its stem, its experiment_name
    assert study_config.row_name([], "fashion_mnist/library_fashion_mnist") == "library_fashion_mnist"
    spec = study_config.load_study("fashion_mnist")
    library = [s for s in spec["sweeps"] if s["part"] == "library"]
    names = [study_config.row_name(s.get("overrides", []), e) for s in library for e in s["experiments"]]
    assert len(set(names)) == len(names) == 12  # alone, KD, ten library methods (KD+LS counted as one)
    dkd = next(s for s in library if "distill=dkd" in s.get("overrides", []))
    args = study_config.sweep_args(spec, dkd, [0, 1, 2], [])
    assert study_config.row_name(args, "library_fashion_mnist") == "lib_dkd_fashion_mnist"


def test_readme_block_is_replaced_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{study_tables.BEGIN}\nold table\n{study_tables.END}\nafter\n")
    study_tables.update_readme("| new |\n", readme)
    assert readme.read_text() == f"# x\n\nbefore\n{study_tables.BEGIN}\n| new |\n{study_tables.END}\nafter\n"
    readme.write_text("no markers\n")
    with pytest.raises(ConfigError, match="no <!-- results:begin -->"):
        study_tables.update_readme("| new |\n", readme)


@pytest.mark.slow  # 15-30 s of CLI runs: in make test-slow (CI runs both)
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
    assert len(csv_rows) == 2 and csv_rows[1].startswith("experiment=dgkd_synthetic_test,dgkd_synthetic_test,heldout,2,0")
    results = sorted((tmp_path / "root" / "01-chain").rglob("results.json"))
    accs = [json.loads(p.read_text())["stages"][-1]["test_acc"] for p in results]
    assert len(accs) == 2 and f"{100 * sum(accs) / 2:.2f} ±" in cells[2]
    assert (out / "chain" / "comparison.html").is_file() and not (out / "broken").exists()
    # --tables-only rebuilds the same tables from the run directories, training nothing
    r = run_study(str(spec), "--tables-only", "--root", str(tmp_path / "root"), "--out", str(tmp_path / "again"),
                  "--no-plots")
    assert r.returncode == 1 and "training" not in r.stdout, r.stdout + r.stderr  # 1: a sweep had failed
    assert (tmp_path / "again" / "results.md").read_text() == md


def test_dafl_part_shares_one_teacher_and_its_table_reports_the_last_epoch():
    """The dafl part: the with-data, noise and DAFL students of one pinned teacher, 3 seeds; in its table a
    data-free row's best-on-val cell is test_acc_best_val (marked †), the last epoch, which it reports, bold."""
    cfg = study_config.load_study("fashion_mnist")
    sweeps = [s for s in cfg["sweeps"] if s["part"] == "dafl"]
    assert [s["experiments"] for s in sweeps] == [["dafl_kd_fashion_mnist", "dafl_noise_fashion_mnist",
                                                  "dafl_fashion_mnist"]]
    assert "+pipeline.per_stage.teacher.seed=0" in sweeps[0]["overrides"] and cfg["seeds"] == [0, 1, 2]
    assert "last epoch" in cfg["parts"]["dafl"]["note"]

    def run(exp: str, seed: int, last: float, best: float, data_free: bool) -> dict:
        student = {"name": "student", "role": "student", "params": 15_738, "test_acc": last if data_free else best,
                   "test_acc_last": last, "val_curve": [0.5, 0.6]}
        if data_free:
            student.update(data_free=True, test_acc_best_val=best)
        return {"experiment": exp, "seed": seed, "status": "completed", "wall_seconds": 60.0, "_dir": "/nonexistent",
                "_path": f"/nonexistent/{exp}/{seed}/results.json", "final": {"stage": "student"},
                "stages": [{"name": "teacher", "role": "teacher", "test_acc": 0.86, "params": 61_706}, student]}

    runs = [run("dafl_kd_fashion_mnist", s, 0.84, 0.85, False) for s in (0, 1)]
    runs += [run("dafl_fashion_mnist", s, 0.60, 0.62, True) for s in (0, 1)]
    md = study_tables.part_markdown("DAFL", compare_runs.aggregate(runs, ["experiment"]), {}, "a note")
    rows = {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")] for line in md.splitlines()
                              if line.startswith("| dafl"))}
    assert rows["dafl_fashion_mnist †"][2:4] == ["62.00 ± 0.00 †", "**60.00 ± 0.00**"]
    assert rows["dafl_kd_fashion_mnist"][2:4] == ["85.00 ± 0.00", "84.00 ± 0.00"]
    assert study_tables.DATA_FREE_FOOTNOTE in md and "comparison.html" in md
    # a part without data-free rows has no footnote
    assert "†" not in study_tables.part_markdown("KD", compare_runs.aggregate(runs[:2], ["experiment"]), {})
