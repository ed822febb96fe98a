"""Fidelity and calibration (kdlab/modules/fidelity.py) against hand computations in numpy and plain loops, on
small fixed tensors: top-1 agreement, KL(p_teacher || p_student) at T = 1 (one teacher and an ensemble's mean
distribution), the expected calibration error with its binning edge cases, and a test pass's outputs in split
order."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from kdlab.modules.fidelity import (
    agreement,
    expected_calibration_error,
    fidelity,
    kl_from_teacher,
    split_outputs,
    teacher_log_probs,
)

STUDENT = [[2.0, 1.0, 0.1], [0.5, 0.5, 3.0], [1.0, 2.0, 1.5], [0.0, 0.0, 0.0], [4.0, -1.0, 2.0]]
TEACHER = [[3.0, 0.5, 0.2], [0.1, 2.5, 2.4], [0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [2.0, 2.0, -3.0]]
TEACHER2 = [[0.0, 1.0, 0.0], [1.0, 0.0, 3.0], [-1.0, 0.5, 2.0], [0.0, 2.0, 0.0], [0.3, 0.1, 0.2]]
LABELS = [0, 2, 1, 1, 0]


def t64(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)  # the lists' values exactly (float32 would round 0.1)


def softmax_by_hand(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def top1_by_hand(row: list[float]) -> int:
    best = 0
    for k, v in enumerate(row):
        if v > row[best]:  # strictly greater: a tie keeps the first of the tied classes
            best = k
    return best


def ece_by_hand(probs: list[list[float]], labels: list[int], n_bins: int = 15) -> float:
    """ECE (l1) of float32 probabilities with bins [i/15, (i+1)/15), the edges in exact arithmetic, and a confidence
    of exactly 1 in a bin of its own (torchmetrics' binning; its edges, torch.linspace(0, 1, 16) in float32, are
    within one float32 step of i/15, and no confidence below lies between the two)."""
    groups: dict[int, list[tuple[float, float]]] = {}
    for row, y in zip(probs, labels):
        row32 = [float(np.float32(p)) for p in row]
        pred = top1_by_hand(row32)
        conf = row32[pred]
        b = n_bins if conf >= 1.0 else max(i for i in range(n_bins) if Fraction(conf) >= Fraction(i, n_bins))
        groups.setdefault(b, []).append((conf, 1.0 if pred == y else 0.0))
    total = sum(len(g) for g in groups.values())
    ece = 0.0
    for members in groups.values():
        acc = sum(a for _, a in members) / len(members)
        conf = sum(c for c, _ in members) / len(members)
        ece += len(members) / total * abs(acc - conf)
    return ece


def test_agreement_by_hand_with_a_tie():
    # row 3 of STUDENT is a three-way tie: class 0, as argmax takes the first; TEACHER row 4 ties 0 and 1: 0
    want = sum(top1_by_hand(s) == top1_by_hand(t) for s, t in zip(STUDENT, TEACHER)) / len(STUDENT)
    assert want == pytest.approx(3 / 5)  # rows 0, 3 and 4 agree
    assert agreement(t64(STUDENT), t64(TEACHER)) == pytest.approx(want, abs=1e-12)
    assert agreement(t64(STUDENT), t64(STUDENT)) == 1.0


def test_kl_from_one_teacher_by_hand():
    want = 0.0
    for s, t in zip(STUDENT, TEACHER):
        ps, pt = softmax_by_hand(s), softmax_by_hand(t)
        want += sum(p * (math.log(p) - math.log(q)) for p, q in zip(pt, ps))
    want /= len(STUDENT)
    got = kl_from_teacher(teacher_log_probs([t64(TEACHER)]), t64(STUDENT))
    assert got == pytest.approx(want, rel=1e-12)
    assert kl_from_teacher(teacher_log_probs([t64(STUDENT)]), t64(STUDENT)) == pytest.approx(0.0,
                                                                                                                abs=1e-15)


def test_an_ensemble_teacher_is_the_mean_of_its_members_distributions():
    mean = [[(a + b) / 2 for a, b in zip(softmax_by_hand(t1), softmax_by_hand(t2))] for t1, t2 in zip(TEACHER, TEACHER2)]
    kl = sum(sum(p * (math.log(p) - math.log(q)) for p, q in zip(pt, softmax_by_hand(s)))
             for pt, s in zip(mean, STUDENT)) / len(STUDENT)
    agree = sum(top1_by_hand(s) == top1_by_hand(pt) for s, pt in zip(STUDENT, mean)) / len(STUDENT)
    logp = teacher_log_probs([t64(TEACHER), t64(TEACHER2)])
    np.testing.assert_allclose(logp.exp().numpy(), np.array(mean), rtol=1e-12)
    got = fidelity(t64(STUDENT), torch.tensor(LABELS), {"teacher1": t64(TEACHER),
                                                                 "teacher2": t64(TEACHER2)},
                   [t64(TEACHER), t64(TEACHER2)])
    assert got["kl_teacher"] == pytest.approx(kl, rel=1e-12)
    assert got["agreement_teacher"] == pytest.approx(agree)
    assert got["agreement"] == {"teacher1": pytest.approx(3 / 5),
                                "teacher2": pytest.approx(sum(top1_by_hand(s) == top1_by_hand(t)
                                                              for s, t in zip(STUDENT, TEACHER2)) / 5)}


def test_kl_with_a_class_the_teacher_rules_out_adds_nothing():
    # the teacher's exp(-1000) underflows to probability 0 (even in float64): 0 * log 0 counts as 0, never NaN
    teacher, student = torch.tensor([[0.0, -1000.0]]), torch.tensor([[0.0, 0.0]])
    got = kl_from_teacher(teacher_log_probs([teacher]), student)
    assert got == pytest.approx(1.0 * (0.0 - math.log(0.5)), rel=1e-12)


def test_ece_by_hand_on_softmax_outputs():
    probs = torch.softmax(torch.tensor(STUDENT, dtype=torch.float64), 1)
    want = ece_by_hand(probs.tolist(), LABELS)
    assert expected_calibration_error(probs, torch.tensor(LABELS)) == pytest.approx(want, abs=1e-6)
    got = fidelity(t64(STUDENT), torch.tensor(LABELS), {}, [])
    assert got == {"ece": pytest.approx(want, abs=1e-6)}  # a stage without sources: its ECE only


@pytest.mark.parametrize("case", ["on_an_edge", "just_below_an_edge", "one", "empty_bins", "one_bin",
                                  "ties_in_a_row"])
def test_ece_binning_edge_cases_by_hand(case):
    e12 = float(np.float32(12 / 15))  # torchmetrics' edge 12: torch.linspace(0, 1, 16)[12] is this float32
    below = float(np.nextafter(np.float32(12 / 15), np.float32(0)))
    rows = {
        # a confidence exactly on the (float32) edge 12/15 opens bin 12 (left-closed bins), with one of 0.85
        "on_an_edge": ([[e12, 1 - e12], [0.85, 0.15], [0.3, 0.7]], [0, 1, 1]),
        # one float32 step below it stays in bin 11
        "just_below_an_edge": ([[below, 1 - below], [0.85, 0.15], [0.3, 0.7]], [0, 1, 1]),
        # a confidence of exactly 1 (wrong) is a bin of its own, apart from 0.95 (right, bin 14)
        "one": ([[1.0, 0.0], [0.95, 0.05]], [1, 0]),
        # most bins empty: they add nothing
        "empty_bins": ([[0.55, 0.45], [0.99, 0.01]], [1, 0]),
        # every confidence in one bin: |accuracy - mean confidence|
        "one_bin": ([[0.61, 0.39], [0.62, 0.38], [0.65, 0.35], [0.64, 0.36]], [0, 0, 1, 1]),
        # a tie between two classes: the first is the prediction (confidence 0.5, bin 7)
        "ties_in_a_row": ([[0.5, 0.5], [0.5, 0.5], [0.7, 0.3]], [0, 1, 0]),
    }
    probs, labels = rows[case]
    want = ece_by_hand(probs, labels)
    got = expected_calibration_error(torch.tensor(probs, dtype=torch.float32), torch.tensor(labels))
    assert got == pytest.approx(want, abs=1e-7), case
    if case == "on_an_edge":  # the edge matters: in bin 11 the same three samples give another ECE
        assert got != pytest.approx(ece_by_hand([[below, 1 - below], *probs[1:]], labels), abs=1e-4)
    if case == "one_bin":  # bin 9: |1/2 - 0.63|
        assert got == pytest.approx(0.13, abs=1e-6)
    if case == "one":  # 1/2 |0 - 1| + 1/2 |1 - 0.95|; in one bin they would give |1/2 - 0.975| = 0.475
        assert got == pytest.approx(0.525, abs=1e-6)


def test_split_outputs_restores_split_order_and_refuses_a_partial_pass():
    torch.manual_seed(0)
    logits, labels = torch.randn(7, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    order = torch.tensor([4, 0, 6, 2, 1, 5, 3])  # a shuffled pass in batches of 3, 3 and 1
    rows = [(order[i:i + 3], logits[order[i:i + 3]], labels[order[i:i + 3]]) for i in (0, 3, 6)]
    got = split_outputs(rows)
    assert got["logits"].dtype == torch.float16 and got["labels"].dtype == torch.int64
    np.testing.assert_array_equal(got["logits"].numpy(), logits.half().numpy())
    np.testing.assert_array_equal(got["labels"].numpy(), labels.numpy())
    assert split_outputs(rows[:2]) is None  # image 3 was never evaluated: nothing is kept from the pass
    assert split_outputs([]) is None
    big = split_outputs([(torch.tensor([0]), torch.tensor([[1e6, -1e6]]), torch.tensor([0]))])
    assert big["logits"].tolist() == [[65504.0, -65504.0]]  # clipped to fp16's range, never inf
