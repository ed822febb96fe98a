"""`make run` ends with its student against the README's figure for its seed (kdlab/cli/expected.py)."""
from __future__ import annotations

import json

from kdlab.cli import expected

EXPECTED = {"experiment": "default", "precision": "32-true", "machine": "AMD EPYC", "tolerance_pp": 0.5,
            "seeds": {"0": {"student_key": "k0", "test_acc": 0.8850, "test_acc_last": 0.8840}}}


def results(seed: int = 0, key: str = "k0", acc: float = 0.8870, experiment: str = "default") -> dict:
    return {"experiment": experiment, "seed": seed, "status": "completed",
            "stages": [{"store_key": "t"}, {"store_key": key, "test_acc": acc, "test_acc_last": acc}],
            "config": {"trainer.precision": "32-true"}}


def test_the_same_configuration_is_compared_within_or_outside_the_measured_tolerance():
    line = expected.compare(results(acc=0.8870), EXPECTED)
    assert "88.50 %" in line and "88.70 %" in line and "(+0.20 pp), within the ±0.5 pp" in line
    line = expected.compare(results(acc=0.8780), EXPECTED)
    assert "(-0.70 pp), OUTSIDE the ±0.5 pp" in line


def test_another_configuration_or_seed_or_experiment_gets_no_verdict():
    line = expected.compare(results(key="other"), EXPECTED)
    assert "another configuration" in line and "k0" in line and "other" in line and "within" not in line
    assert expected.compare(results(seed=7), EXPECTED) is None
    assert expected.compare(results(experiment="kd_fashion_mnist"), EXPECTED) is None
    assert expected.compare(results(), None) is None


def test_write_reads_a_finished_sweep_and_compare_reads_it_back(tmp_path):
    for i, (seed, acc) in enumerate([(0, 0.88), (1, 0.89)]):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "results.json").write_text(json.dumps(results(seed=seed, key=f"k{seed}", acc=acc)))
    out = tmp_path / "default_run.json"
    written = expected.write(tmp_path, "AMD EPYC", 0.4, path=out)
    assert written["precision"] == "32-true" and set(written["seeds"]) == {"0", "1"}
    line = expected.compare(results(seed=1, key="k1", acc=0.89), expected.load(out))
    assert "(+0.00 pp), within the ±0.4 pp" in line


def test_the_shipped_figures_name_their_machine_precision_and_tolerance():
    shipped = expected.load()
    assert shipped is not None, f"{expected.EXPECTED} is missing: the README's default-run figures"
    assert {"experiment", "precision", "machine", "tolerance_pp", "seeds"} <= set(shipped)
    assert shipped["experiment"] == "default" and shipped["precision"] == "32-true" and set(shipped["seeds"]) >= {"0"}
    readme = (expected.ROOT / "README.md").read_text(encoding="utf-8")
    for seed, fig in shipped["seeds"].items():  # the README's table shows the same figures
        assert f"| {seed} | {100 * fig['test_acc']:.2f} / {100 * fig['test_acc_last']:.2f} |" in readme, seed
    assert f"±{shipped['tolerance_pp']:g} pp" in readme


def test_writing_from_a_directory_without_runs_is_one_line_exit_2(tmp_path, capsys):
    assert expected.main(["--write", str(tmp_path), "--machine", "m", "--tolerance-pp", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdlab.cli.expected: error: no completed run under")
