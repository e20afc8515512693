"""Documentation lint (not a timing test): every figure quoted in docs/PERFORMANCE.md and the model card
appears in the results file it names.

Convention (written at the top of docs/PERFORMANCE.md, for whoever adds figures there):
- a table of measured figures is preceded by a marker line naming its results file, relative to the repo root:
  `<!-- results: bench/results/NAME.jsonl -->` (JSON lines written by a script in bench/ or eval/, each with
  machine, date and commit); blank lines may separate the marker from the table;
- every number in the table's body, except in its first column (the row's label), must equal a number
  somewhere in that file (any key, any line, nested) at the precision shown: 98.4 matches 98.43, 53.4 % matches
  0.5335 (a fraction shown as a percentage), 1.1e-05 matches 1.09e-05, 28,576 matches 28576, and a range
  "0.80-1.17" is two numbers. A cell "-" holds none;
- a table whose numbers are not measurements (targets, settings) is preceded by `<!-- results: none (why) -->`;
- a table of figures measured elsewhere and reported to us (another machine, an earlier session), which no
  results file here holds, is preceded by `<!-- results: reported (who, where, when; no results file in this
  repo) -->`: the marker must say those words, so a reader (and the lint) can tell it from a measurement here;
- a table with numbers and no marker fails the lint.
The model card (rewardsvc/default_model/MODEL_CARD.md) is generated from rewardsvc.json beside it (the training
run's results, written by training/train_default.py): every number in its tables must be in that file.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PERFORMANCE = ROOT / "docs" / "PERFORMANCE.md"
CARD_DIR = ROOT / "rewardsvc" / "default_model"
MARKER = re.compile(r"^<!--\s*results:\s*(?P<target>.+?)\s*-->\s*$")
# A number: optional sign (only where it cannot be a range dash), digits with optional thousands commas,
# decimals, exponent.
NUMBER = re.compile(r"(?<![\w.])(?P<sign>(?<![\d)])-)?(?P<body>\d{1,3}(?:,\d{3})+|\d+)(?P<frac>\.\d+)?(?P<exp>e[+-]?\d+)?(?![\d,]\d|\.\d|\d)")


def numbers_in(cell: str) -> list[tuple[float, float]]:
    """(value, half of the last shown digit) of every number in a table cell."""
    found = []
    for m in NUMBER.finditer(cell):
        text = (m.group("sign") or "") + m.group("body").replace(",", "") + (m.group("frac") or "")
        decimals = len(m.group("frac") or "") - 1 if m.group("frac") else 0
        exponent = int(m.group("exp")[1:]) if m.group("exp") else 0
        found.append((float(text) * 10**exponent, 0.5 * 10 ** (exponent - decimals)))
    return found


def values_in(data) -> list[float]:
    if isinstance(data, bool):
        return []
    if isinstance(data, (int, float)):
        return [float(data)] if math.isfinite(data) else []
    if isinstance(data, dict):
        return [v for x in data.values() for v in values_in(x)] + [v for k in data for v in values_in(_as_number(k))]
    if isinstance(data, list):
        return [v for x in data for v in values_in(x)]
    if isinstance(data, str):
        return values_in(_as_number(data))
    return []


def _as_number(text: str):
    try:
        return float(text)
    except ValueError:
        return None


def results_values(path: Path) -> list[float]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return values_in(json.loads(text))
    return [v for line in text.splitlines() if line.strip() for v in values_in(json.loads(line))]


def shown_in(value: float, half: float, values: list[float]) -> bool:
    slack = half * (1 + 1e-9) + 1e-12
    return any(abs(v - value) <= slack or abs(100 * v - value) <= slack for v in values)


def tables(lines: list[str]) -> list[tuple[int, str | None, list[list[str]]]]:
    """(first line number, marker target or None, body rows as cells) of every markdown table."""
    out, i, marker = [], 0, None
    while i < len(lines):
        line = lines[i].strip()
        m = MARKER.match(line)
        if m:
            marker = m.group("target")
        elif line.startswith("|"):
            start, rows = i, []
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            body = [r for r in rows[1:] if not all(re.fullmatch(r":?-+:?", c) for c in r)]
            out.append((start + 1, marker, body))
            marker = None
            continue
        elif line:
            marker = None if not line.startswith("<!--") else marker
        i += 1
    return out


def figures(body: list[list[str]]) -> list[tuple[str, float, float]]:
    return [(cell, value, half) for row in body for cell in row[1:] for value, half in numbers_in(cell.replace("`", ""))]


def test_number_parsing():
    assert numbers_in("98.4") == [(98.4, 0.05)]
    assert numbers_in("**1.80x**") == [(1.8, 0.005)]
    assert [v for v, _ in numbers_in("0.80-1.17")] == [0.8, 1.17]
    assert [v for v, _ in numbers_in("-0.026")] == [-0.026]
    assert [v for v, _ in numbers_in("28,576 tokens")] == [28576]
    [(value, half)] = numbers_in("1.1e-05")
    assert value == pytest.approx(1.1e-05) and half == pytest.approx(0.05e-05)
    assert numbers_in("-") == [] and numbers_in("int8") == [] and numbers_in("fp32") == []
    assert shown_in(53.4, 0.05, [0.53351]) and not shown_in(53.4, 0.05, [0.5346])


REPORTED_NOTE = "no results file in this repo"


def marked_table_problems(doc: str, line: int, target: str, found) -> list[str]:
    """What is wrong with a table marked `<!-- results: target -->`: a missing file, or figures not in it; a
    `reported (...)` marker that does not say it has no results file here."""
    if target.startswith("reported"):
        ok = target.startswith("reported (") and target.endswith(")") and REPORTED_NOTE in target
        return [] if ok else [f"{doc}:{line}: a `reported` marker must read `reported (source; {REPORTED_NOTE})`, got {target!r}"]
    path = ROOT / target
    if not path.is_file():
        return [f"{doc}:{line}: results file {target} does not exist"]
    values = results_values(path)
    return [f"{doc}:{line}: {cell!r} ({value:g}) is not in {target}"
            for cell, value, half in found if not shown_in(value, half, values)]  # fmt: skip


def test_performance_tables_name_their_results_and_every_figure_is_in_it():
    problems = []
    for line, target, body in tables(PERFORMANCE.read_text(encoding="utf-8").splitlines()):
        found = figures(body)
        if target is None:
            if found:
                problems.append(f"docs/PERFORMANCE.md:{line}: a table with figures ({found[0][0]!r}, ...) and no "
                                f"`<!-- results: FILE -->` marker")  # fmt: skip
            continue
        if not target.startswith("none"):
            problems += marked_table_problems("docs/PERFORMANCE.md", line, target, found)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", sorted(p.relative_to(ROOT).as_posix() for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
                                        if p != PERFORMANCE))  # fmt: skip
def test_marked_tables_elsewhere_match_their_results(doc):
    """Other docs need no marker on every table, but a table that has one is checked the same way."""
    problems = []
    for line, target, body in tables((ROOT / doc).read_text(encoding="utf-8").splitlines()):
        if target is not None and not target.startswith("none"):
            problems += marked_table_problems(doc, line, target, figures(body))
    assert not problems, "\n".join(problems)


def test_model_card_figures_are_in_its_results():
    card = (CARD_DIR / "MODEL_CARD.md").read_text(encoding="utf-8").splitlines()
    values = results_values(CARD_DIR / "rewardsvc.json")
    checked, problems = 0, []
    for line, _, body in tables(card):
        for cell, value, half in figures(body):
            checked += 1
            if not shown_in(value, half, values):
                problems.append(f"MODEL_CARD.md:{line}: {cell!r} ({value:g}) is not in rewardsvc.json")
    assert checked > 100 and not problems, "\n".join(problems)


def test_the_lint_catches_a_figure_that_is_not_in_its_file(tmp_path):
    results = tmp_path / "r.jsonl"
    results.write_text(json.dumps({"tokens_per_s": 98.43, "accuracy": 0.5335}) + "\n")
    doc = [f"<!-- results: {results} -->", "", "| mode | tok/s | acc |", "|---|---|---|", "| a 12 | 98.4 | 53.4 % |",
           "| b | 98.5 | - |"]  # fmt: skip
    [(_, target, body)] = tables(doc)
    values = results_values(Path(target))
    assert [(c, v) for c, v, h in figures(body) if not shown_in(v, h, values)] == [("98.5", 98.5)]
    [(_, target, _)] = tables(["<!-- results: x -->", "text between", "| a | b |", "|---|---|", "| x | 1 |"])
    assert target is None  # a marker applies to the table right after it only


def test_reported_figures_need_the_words_that_say_so():
    found = [("1.71", 1.71, 0.005)]
    assert marked_table_problems("d.md", 1, "reported (an earlier session, Intel AMX; no results file in this repo)", found) == []
    [problem] = marked_table_problems("d.md", 1, "reported (an earlier session)", found)
    assert "no results file in this repo" in problem
