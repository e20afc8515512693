"""Arena-Bench v1 (lmarena/arena-hard-auto, early commits; Apache-2.0): 300 Chatbot Arena questions,
answers of 18 models, and GPT-4 grades (1-10) of 16 of them made against a GPT-4 reference answer.

The grades are the first correctness labels in the data: bimodal, 1-2 mostly means wrong, 8-10 right.

- Grades come from `model_judgment/*.jsonl`. The `model` field names the graded model, not the file
  name (two files differ from it), and Mistral/Mixtral carry a `mistralai/` prefix there that the
  answer files' `model_id` also carries; it is stripped on both sides. `score: null` (the judge
  gave no rating, 40 rows) is dropped and counted.
- The graded text is the one between the "[The Start/End of Assistant's Answer]" markers of the
  judge prompt. Each grade is matched to `model_answer/<model>.jsonl` by model id and question id.
  For 428 grades (Llama-2-70b-chat 195, claude-2 166, vicuna-33b-v1.3 67; 423 of them kept as rows)
  the answer file holds another sample than the one graded; the grade belongs to the text the judge
  read, so that text is used (`answer_text`), never the file's. Where both agree (up to surrounding
  whitespace) the file's text is used.
- Empty graded answers are dropped, and so is the second of two models' identical answers (up to
  surrounding whitespace) to one question (3 cases, same grade each time): one answer, one row.

Stage 1 (source `arena-bench`, attribute `correctness`): every remaining graded answer.
Pairs (source `arena-bench`, subset `arena-bench`, category `reasoning`): every two answers to one
question whose grades differ by >= MIN_GRADE_GAP, the higher grade chosen. build.py caps them per
question (DEFAULT_GROUP_CAPS) after its length filter, so that no question dominates stage 2.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

from ...errors import InvalidInputError
from .attributes import make_labels
from .files import read_jsonl, resolve_data_dir
from .grouping import group_key
from .schema import PreferencePair, RatedConversation

SOURCE = "arena-bench"
FOLDER = "arena-bench-v1"
CATEGORY = "reasoning"
MIN_GRADE_GAP = 3
"""Smallest grade difference that makes a pair: the grades are bimodal (right / wrong), so a gap of 3
mostly separates a right answer from a wrong one rather than two judge samples of the same quality."""
MODEL_PREFIX = "mistralai/"
ANSWER_START = "[The Start of Assistant's Answer]\n"
ANSWER_END = "\n[The End of Assistant's Answer]"


@dataclass(frozen=True)
class GradedAnswer:
    """One model's answer to one question with the judge's grade."""

    question_id: str
    model: str
    grade: float
    answer: str
    answer_text: str
    """'file' when the answer file's text is the graded one, 'judgment' when only the judge prompt has it."""


def model_id(name: str) -> str:
    """A model name as both the answers and the judgments can be matched on (the `mistralai/` prefix removed)."""
    return name.removeprefix(MODEL_PREFIX)


def graded_text(user_prompt: str, where: str) -> str:
    """The answer the judge graded: the text between the assistant-answer markers of its prompt."""
    if user_prompt.count(ANSWER_START) != 1 or not user_prompt.endswith(ANSWER_END):
        raise InvalidInputError(f"{where}: user_prompt does not hold exactly one assistant answer between "
                                f"{ANSWER_START.strip()!r} and {ANSWER_END.strip()!r}", field="user_prompt")
    return user_prompt.split(ANSWER_START, 1)[1][: -len(ANSWER_END)]


def questions(data_dir=None) -> dict[str, str]:
    """question_id -> the (single-turn) question."""
    out = {}
    for row in read_jsonl(resolve_data_dir(data_dir) / FOLDER / "question.jsonl"):
        if len(row["turns"]) != 1:
            raise InvalidInputError(f"arena-bench question {row['question_id']}: expected one turn, got "
                                    f"{len(row['turns'])}", field="turns")
        out[row["question_id"]] = row["turns"][0]
    return out


def _answer_files(root) -> dict[tuple[str, str], str]:
    """(model id, question id) -> the first turn of that model's answer (the questions are single-turn)."""
    answers = {}
    for path in sorted((root / FOLDER / "model_answer").glob("*.jsonl")):
        for row in read_jsonl(path):
            answers[(model_id(row["model_id"]), row["question_id"])] = row["choices"][0]["turns"][0]
    return answers


def graded_answers(data_dir=None, dropped: Counter | None = None, kind: str = "rated") -> list[GradedAnswer]:
    """Every usable graded answer, sorted by (question id, model); drops counted in `dropped` under
    'arena-bench <kind>: <reason>' (each loader reads the grades: its own key, so no drop is counted twice)."""
    dropped = dropped if dropped is not None else Counter()
    root = resolve_data_dir(data_dir)
    known = questions(root)
    answers = _answer_files(root)
    out: dict[tuple[str, str], GradedAnswer] = {}
    for path in sorted((root / FOLDER / "model_judgment").glob("*.jsonl")):
        for line, row in enumerate(read_jsonl(path), 1):
            where = f"{path.name} line {line}"
            model, qid = model_id(row["model"]), row["question_id"]
            if qid not in known:
                raise InvalidInputError(f"{where}: unknown question_id {qid!r}", field="question_id")
            if (model, qid) in out:
                raise InvalidInputError(f"{where}: a second grade of {model} on question {qid}", field="model")
            if row["score"] is None:
                dropped[f"{SOURCE} {kind}: no grade (score null)"] += 1
                continue
            if (model, qid) not in answers:
                raise InvalidInputError(f"{where}: no model_answer row for model {model!r} (question {qid})",
                                        field="model")
            text, file_text = graded_text(row["user_prompt"], where), answers[(model, qid)]
            same = text.strip() == file_text.strip()
            answer = file_text if same else text
            if not answer.strip():
                dropped[f"{SOURCE} {kind}: empty answer"] += 1
                continue
            out[(model, qid)] = GradedAnswer(qid, model, float(row["score"]), answer, "file" if same else "judgment")
    kept, seen = [], set()
    for key in sorted(out, key=lambda k: (k[1], k[0])):
        graded = out[key]
        if (graded.question_id, graded.answer.strip()) in seen:
            dropped[f"{SOURCE} {kind}: the same answer as another model's to that question"] += 1
            continue
        seen.add((graded.question_id, graded.answer.strip()))
        kept.append(graded)
    return kept


def _prompt(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def load_rated(data_dir=None, dropped: Counter | None = None) -> list[RatedConversation]:
    """Every graded answer with its grade as `correctness` (source `arena-bench`)."""
    known = questions(data_dir)
    out = []
    for g in graded_answers(data_dir, dropped):
        prompt = _prompt(known[g.question_id])
        out.append(RatedConversation(
            id=f"{SOURCE}/{g.question_id}/{g.model}", source=SOURCE,
            messages=prompt + [{"role": "assistant", "content": g.answer}],
            labels=make_labels(g.answer, correctness=g.grade), group=group_key(prompt),
        ))
    return out


def load_pairs(data_dir=None, dropped: Counter | None = None) -> list[PreferencePair]:
    """Every two answers to one question whose grades differ by >= MIN_GRADE_GAP (uncapped; build.py caps)."""
    known = questions(data_dir)
    by_question: dict[str, list[GradedAnswer]] = {}
    for g in graded_answers(data_dir, dropped, "pairs"):
        by_question.setdefault(g.question_id, []).append(g)
    out = []
    for qid, graded in by_question.items():
        prompt = _prompt(known[qid])
        for a, b in itertools.combinations(graded, 2):
            if abs(a.grade - b.grade) < MIN_GRADE_GAP:
                continue
            chosen, rejected = (a, b) if a.grade > b.grade else (b, a)
            out.append(PreferencePair(
                id=f"{SOURCE}/{qid}/{chosen.model}>{rejected.model}", source=SOURCE, prompt=prompt,
                chosen=chosen.answer, rejected=rejected.answer, subset=SOURCE, category=CATEGORY,
                group=group_key(prompt),
            ))
    return out
