"""A sweep's shared stages (kdlab/pipeline/sweep_plan.py): which stages two or more jobs need and the store lacks,
in waves (a stage after the shared stages it learns from), and every job's real keys with the data module built
once per distinct data config."""
from __future__ import annotations

import pytest

from kdlab.pipeline import sweep_plan
from kdlab.pipeline.sweep_plan import JobStages, shared_stages, waves
from tests.helpers.config import compose_config


def job(i: int, *stages: tuple[str, str, list[str]], store: str = "s", error: str | None = None) -> JobStages:
    return JobStages(index=i, store_dir=store, stages=list(stages), error=error)


def chain(i: int, ta: str, student: str, store: str = "s") -> JobStages:
    """teacher T -> ta -> student (keys as given), as a TAKD pipeline of job i."""
    return job(i, ("teacher", "T", []), ("ta1", ta, ["teacher"]), ("student", student, ["ta1"]), store=store)


def nothing_stored(store: str, key: str) -> bool:
    return False


def test_a_teacher_shared_by_every_job_then_tas_shared_in_pairs():
    jobs = [chain(0, "A", "s0"), chain(1, "A", "s1"), chain(2, "B", "s2"), chain(3, "B", "s3")]
    shared = shared_stages(jobs, nothing_stored)
    got = [(s.key, s.name, s.job, s.jobs, s.wave, s.stages) for s in shared]
    assert got == [("T", "teacher", 0, [0, 1, 2, 3], 0, ["teacher"]),
                   ("A", "ta1", 0, [0, 1], 1, ["teacher", "ta1"]),  # its teacher comes from the store by then
                   ("B", "ta1", 2, [2, 3], 1, ["teacher", "ta1"])]
    assert [[s.key for s in w] for w in waves(shared)] == [["T"], ["A", "B"]]  # A and B in parallel


def test_stored_stages_are_not_planned_and_their_students_move_up_a_wave():
    jobs = [chain(0, "A", "s0"), chain(1, "A", "s1"), chain(2, "B", "s2"), chain(3, "B", "s3")]
    shared = shared_stages(jobs, lambda store, key: key == "T")
    assert [(s.key, s.wave) for s in shared] == [("A", 0), ("B", 0)]
    assert shared_stages(jobs, lambda store, key: True) == []


def test_nothing_is_shared_across_stores_by_one_job_or_by_a_job_that_failed_to_plan():
    assert shared_stages([chain(0, "A", "s0"), chain(1, "A", "s1", store="other")], nothing_stored) == []
    assert shared_stages([chain(0, "A", "s0")], nothing_stored) == []
    # a job needing a stage twice (two stages with one key) is still one job
    twice = job(0, ("teacher1", "T", []), ("teacher2", "T", []), ("student", "s0", ["teacher1", "teacher2"]))
    assert shared_stages([twice], nothing_stored) == []
    failed = job(1, error="ConfigError: bad")  # not planned: no stages
    assert shared_stages([chain(0, "A", "s0"), failed], nothing_stored) == []


def test_parallel_teachers_of_different_seeds_train_in_one_wave():
    """2 methods x 2 seeds: a teacher per seed, each shared by the two methods of that seed."""
    jobs = [job(0, ("teacher", "T0", []), ("student", "kd0", ["teacher"])),
            job(1, ("teacher", "T1", []), ("student", "kd1", ["teacher"])),
            job(2, ("teacher", "T0", []), ("ta1", "d0", ["teacher"]), ("student", "dg0", ["teacher", "ta1"])),
            job(3, ("teacher", "T1", []), ("ta1", "d1", ["teacher"]), ("student", "dg1", ["teacher", "ta1"]))]
    shared = shared_stages(jobs, nothing_stored)
    assert [(s.key, s.jobs, s.wave) for s in shared] == [("T0", [0, 2], 0), ("T1", [1, 3], 0)]


def test_job_stages_builds_the_data_once_per_data_config(monkeypatch, tmp_path):
    built = []
    real = sweep_plan.build_datamodule

    def counting(data_cfg, batch_size, seed=0):
        built.append((data_cfg["n_train"], seed))
        return real(data_cfg, batch_size=batch_size, seed=seed)

    monkeypatch.setattr(sweep_plan, "build_datamodule", counting)
    base = ["preset=none", "data=synthetic", "data.n_train=200", "data.n_test=50", "pipeline=direct",
            "pipeline.chain=[plain4,plain2]", "distill=kd", f"paths.store_dir={tmp_path}"]
    cfgs = [compose_config(*base, "seed=0", "distill.temperature=2"),
            compose_config(*base, "seed=0", "distill.temperature=4"),
            compose_config(*base, "seed=1", "distill.temperature=2"),
            compose_config(*base[:2], "data.n_train=300", *base[3:], "seed=0")]
    planned = sweep_plan.job_stages(cfgs)
    assert built == [(200, 0), (300, 0)]  # the seed orders the data, it does not change it
    assert all(j.error is None and [n for n, _, _ in j.stages] == ["teacher", "student"] for j in planned)
    teacher = [{n: k for n, k, _ in j.stages}["teacher"] for j in planned]
    student = [{n: k for n, k, _ in j.stages}["student"] for j in planned]
    assert teacher[0] == teacher[1] != teacher[2] != teacher[3]  # T changes the student only; seed and data all
    assert len(set(student)) == 4
    shared = shared_stages(planned)
    assert [(s.name, s.jobs) for s in shared] == [("teacher", [0, 1])]


def test_a_job_that_cannot_be_planned_is_left_out(tmp_path):
    good = compose_config("preset=none", "data=synthetic", "data.n_train=200", "data.n_test=50", "pipeline=direct",
                          "pipeline.chain=[plain4,plain2]", f"paths.store_dir={tmp_path}")
    bad = compose_config("preset=none", "data=synthetic", "data.n_train=200", "data.n_test=50", "pipeline=direct",
                         "pipeline.chain=[plain4,plain2]", "optimizer.lr=-1", f"paths.store_dir={tmp_path}")
    planned = sweep_plan.job_stages([good, bad])
    assert planned[0].error is None and planned[0].stages
    assert planned[1].stages == [] and "optimizer.lr (stage teacher) must be > 0" in planned[1].error


@pytest.mark.parametrize("stored_keys", [set(), {"T"}])
def test_every_wave_learns_only_from_stored_stages_or_earlier_waves(stored_keys):
    jobs = [chain(0, "A", "s0"), chain(1, "A", "s1"), chain(2, "B", "s2"), chain(3, "B", "s3")]
    shared = shared_stages(jobs, lambda store, key: key in stored_keys)
    done = set(stored_keys)
    for w in waves(shared):
        for s in w:
            names = {n: (k, srcs) for n, k, srcs in jobs[s.job].stages}
            for src in names[s.name][1]:
                assert names[src][0] in done, (s.key, src)
        done |= {s.key for s in w}
