"""Arena-Bench v1 on the real staged data: the `correctness` rows, the graded pairs and their place in the build.

The expectations are recomputed here from the raw files (question.jsonl, model_answer/, model_judgment/) with
plain json, not with the adapter's helpers.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter, defaultdict

import pytest

from rewardsvc.training.data import build_training_sets, default_data_dir
from rewardsvc.training.data.arena_bench import load_pairs, load_rated
from rewardsvc.training.data.build import DEFAULT_GROUP_CAPS
from rewardsvc.training.data.splits import PAIR_SPLIT_RULES

DATA = default_data_dir()
RAW = DATA / "arena-bench-v1"
CAP = DEFAULT_GROUP_CAPS["stage2/arena-bench"]
pytestmark = pytest.mark.needs_data


def jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def raw():
    """(question id -> question, (question id, model) -> (grade or None, graded text, answer-file text))."""
    questions = {q["question_id"]: q["turns"][0] for q in jsonl(RAW / "question.jsonl")}
    answers = {}
    for path in (RAW / "model_answer").glob("*.jsonl"):
        for row in jsonl(path):
            answers[(row["question_id"], row["model_id"].replace("mistralai/", ""))] = row["choices"][0]["turns"][0]
    grades = {}
    for path in (RAW / "model_judgment").glob("*.jsonl"):
        for row in jsonl(path):
            key = (row["question_id"], row["model"].replace("mistralai/", ""))
            graded = row["user_prompt"].split("[The Start of Assistant's Answer]\n")[1]
            graded = graded.split("\n[The End of Assistant's Answer]")[0]
            grades[key] = (row["score"], graded, answers[key])
    return questions, grades


@pytest.fixture(scope="module")
def dropped():
    return Counter()


@pytest.fixture(scope="module")
def rated(dropped):
    return load_rated(DATA, dropped)


@pytest.fixture(scope="module")
def pairs(dropped):
    return load_pairs(DATA, dropped)


@pytest.fixture(scope="module")
def sets():
    return build_training_sets(DATA)


def test_raw_files_are_as_source_md_says(raw):
    questions, grades = raw
    assert len(questions) == 300 and len(grades) == 4800  # 16 graded models x 300
    assert sum(score is None for score, _, _ in grades.values()) == 40
    assert len({model for _, model in grades}) == 16


def test_every_non_null_grade_is_a_row_or_a_counted_drop(raw, rated, dropped):
    _, grades = raw
    assert dropped["arena-bench rated: no grade (score null)"] == 40
    graded = {k for k, (score, _, _) in grades.items() if score is not None}
    empty = {k for k in graded if not grades[k][1].strip()}
    assert dropped["arena-bench rated: empty answer"] == len(empty) > 0
    assert len(rated) + len(empty) + dropped["arena-bench rated: the same answer as another model's to that question"] == 4760
    rows = {tuple(r.id.split("/")[1:]) for r in rated}
    assert not rows & {k for k, (score, _, _) in grades.items() if score is None}  # null grades never become rows


def test_rows_carry_the_grade_of_the_text_the_judge_read(raw, rated):
    questions, grades = raw
    from_judgment = 0
    for row in rated:
        _, qid, model = row.id.split("/")
        score, graded, file_text = grades[(qid, model)]
        assert row.labels["correctness"] == score
        assert row.messages == [{"role": "user", "content": questions[qid]},
                                {"role": "assistant", "content": row.response}]
        assert row.response.strip() == graded.strip()
        from_judgment += row.response.strip() != file_text.strip()
        assert [n for n, v in row.labels.items() if v is not None] == ["correctness", "verbosity"]
    # The answer files hold another sample than the graded one for 428 grades (Llama-2-70b-chat, claude-2,
    # vicuna-33b-v1.3); 423 of them are rows (the other 5 have no grade)
    assert from_judgment == 423


def test_pairs_are_every_pair_with_a_grade_gap_of_three(raw, rated, pairs):
    questions, grades = raw
    kept = {tuple(r.id.split("/")[1:]) for r in rated}
    by_question = defaultdict(list)
    for (qid, model), (score, graded, _) in grades.items():
        if (qid, model) in kept:
            by_question[qid].append((score, graded.strip()))
    expected = set()
    for qid, answers in by_question.items():
        for (sa, ta), (sb, tb) in itertools.combinations(answers, 2):
            if abs(sa - sb) >= 3:
                expected.add((questions[qid], ta if sa > sb else tb, tb if sa > sb else ta))
    got = [(p.prompt[0]["content"], p.chosen.strip(), p.rejected.strip()) for p in pairs]
    assert len(got) == len(set(got)) == len(expected) > 10_000
    assert set(got) == expected
    grade_of = {(questions[q], t): s for q, answers in by_question.items() for s, t in answers}
    for pair in pairs:
        chosen, rejected = grade_of[(pair.prompt[0]["content"], pair.chosen.strip())], grade_of[(pair.prompt[0]["content"], pair.rejected.strip())]
        assert chosen - rejected >= 3, pair.id
        assert (pair.source, pair.subset, pair.category) == ("arena-bench", "arena-bench", "reasoning")


def test_build_caps_pairs_per_question(sets):
    arena = [p for p in sets.stage2_train + sets.stage2_val if p.source == "arena-bench"]
    per_question = Counter(p.group for p in arena)
    assert max(per_question.values()) == CAP
    assert sum(n == CAP for n in per_question.values()) > 0.75 * len(per_question)  # most questions weigh the same
    assert 1000 < len(arena) < 1800
    assert sets.dropped[f"stage2/arena-bench: over the cap of {CAP} per prompt group"] > 4000


def test_whole_questions_on_one_side_and_never_in_eval(sets):
    assert PAIR_SPLIT_RULES["arena-bench"].eval_fraction == 0.0
    side = defaultdict(set)
    for split, items in (("train", sets.stage1_train + sets.stage2_train), ("val", sets.stage1_val + sets.stage2_val)):
        for item in items:
            if item.source == "arena-bench":
                side[item.group].add(split)
    assert len(side) > 250 and all(len(s) == 1 for s in side.values())
    assert 0.08 < sum(s == {"val"} for s in side.values()) / len(side) < 0.25
    eval_groups = {p.group for p in sets.eval_pairs}
    assert not eval_groups & set(side)
    assert not any(p.source == "arena-bench" for p in sets.eval_pairs)
    # a question's stage-1 rows sit with its pairs
    for pair in sets.stage2_train + sets.stage2_val:
        if pair.source == "arena-bench":
            rows = [r for r in sets.stage1_train + sets.stage1_val if r.group == pair.group]
            assert rows and {("train" if r in sets.stage1_train else "val") for r in rows} == side[pair.group]
            break


def test_build_includes_correctness_rows(sets):
    train = [r for r in sets.stage1_train if r.source == "arena-bench"]
    val = [r for r in sets.stage1_val if r.source == "arena-bench"]
    assert len(train) > 1500 and len(val) > 200
    assert all(r.labels["correctness"] is not None for r in train + val)
    assert all(r.labels["correctness"] is None for r in sets.stage1_train if r.source != "arena-bench")
    # the pairs' conversations are stage-1 rows too: stage 2 adds no conversation of its own
    rows = {(r.prompt[0]["content"], r.response) for r in train + val}
    for pair in sets.stage2_train + sets.stage2_val:
        if pair.source == "arena-bench":
            assert (pair.prompt[0]["content"], pair.chosen) in rows and (pair.prompt[0]["content"], pair.rejected) in rows
