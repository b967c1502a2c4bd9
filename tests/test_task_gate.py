"""The task gate's arithmetic on hand-made answers, and the greedy requirement "answer"."""

from __future__ import annotations

import pytest

from mvlm_compile.verify.task_eval import ItemResult, TaskEval
from mvlm_compile.verify.verifier import required_greedy_prefix

EOS = 2


def _item(index, kind, expected, answer, tokens, reference_tokens, reference_text, combo=False, wording=False):
    return ItemResult(index, kind, "q", expected, answer, tokens, reference_tokens, reference_text, combo, wording)


# Four answers, checked by hand: the reference is right on items 0, 1, 2 and wrong on 3; the
# backend under test is right on 0 and 3, wrong on 1 and 2; its tokens equal the reference's on
# 0 only; matching leading tokens 3, 1, 0, 2 of 3 + 3 + 2 + 4 reference tokens.
RESULTS = [
    _item(0, "colour", "Red.", "Red.", [10, 11, EOS], [10, 11, EOS], "Red."),
    _item(1, "colour", "Blue.", "Green.", [12, 13, EOS], [12, 14, EOS], "Blue.", combo=True),
    _item(2, "count", "Two.", "One.", [15, EOS], [16, EOS], "Two.", wording=True),
    _item(3, "shape", "A star.", "A star.", [17, 18, 19, 20], [17, 18, 21, EOS], "A circle.", combo=True),
]


def test_summary_counts_what_it_says():
    summary = TaskEval("a", "int4", RESULTS).summary()
    assert summary["items"] == 4
    assert summary["exact_match"] == 0.5  # items 0 and 3
    assert summary["reference_exact_match"] == 0.75  # items 0, 1, 2
    assert summary["identical_to_reference"] == 0.25  # item 0
    assert summary["token_agreement"] == round((3 + 1 + 0 + 2) / (3 + 3 + 2 + 4), 4)
    assert summary["by_kind"] == {"colour": 0.5, "count": 0.0, "shape": 1.0}
    assert summary["held_out_combination"] == 0.5 and summary["held_out_phrasing"] == 0.0
    assert summary["seen"] == 1.0


@pytest.mark.parametrize(
    "tolerance,passed",
    [
        ({"task_identical": 0.25, "task_exact_match_drop": 0.25}, True),  # drop 0.75 - 0.5 = 0.25
        ({"task_identical": 0.25, "task_exact_match_drop": 0.2}, False),
        ({"task_identical": 0.5, "task_exact_match_drop": 0.5}, False),  # 1 of 4 identical
        ({}, False),  # no tolerance: identical answers, no drop
    ],
)
def test_gate(tolerance, passed):
    gate = TaskEval("a", "int4", RESULTS, tolerance).gate()
    assert gate["exact_match_drop"] == 0.25 and gate["passed"] is passed


def test_all_fp32_graphs_need_every_golden_token_and_answer_means_through_eos():
    golden = [30, 31, 32, EOS, 40, 41]
    assert required_greedy_prefix({"fp32"}, golden, {"fp32": {"greedy_prefix": 0}}, EOS) == 6
    assert required_greedy_prefix({"int4", "fp16"}, golden, {"int4": {"greedy_prefix": "answer"}}, EOS) == 0
    both = {"int4": {"greedy_prefix": "answer"}, "fp16": {"greedy_prefix": "answer"}}
    assert required_greedy_prefix({"int4", "fp16"}, golden, both, EOS) == 4
    assert required_greedy_prefix({"int4"}, golden, {"int4": {"greedy_prefix": 5}}, EOS) == 5
    assert required_greedy_prefix({"int4"}, [30, 31], {"int4": {"greedy_prefix": "answer"}}, EOS) == 2
