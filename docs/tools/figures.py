"""One figure per fact: every measured figure in README.md and docs/ comes from a results file.

Three rules, checked by ``tests/test_docs_figures.py`` and by ``python docs/tools/figures.py``
(``--write`` regenerates what is generated):

1. **Quoted figure.** A markdown link to a file under ``benchmarks/results/`` whose title picks
   one cell. The link text must show that cell's value:

       [0.239 s](benchmarks/results/real_failure_coordinator.csv "phase=total: kill -> next completed step @ value")

   CSV title: ``COLUMN=VALUE & COLUMN=VALUE @ COLUMN`` (the one row whose columns equal the
   values; ``COLUMN~=TEXT`` matches a substring; ``#N`` is the N-th data row from 0) and, after
   ``@``, the column read. The first number of the link text must equal the cell rounded to as
   many decimals as the text shows. (No ``|`` in a title: a table row would split there.)
   Markdown title: ``table=HEADING & row=FIRST CELL @ COLUMN HEADER`` (the first table below the
   heading that contains HEADING; ``row~=`` matches a substring). Every number of the link text
   must appear in that cell.
2. **Generated block.** ``<!-- generated: NAME -->`` ... ``<!-- /generated -->`` holds exactly
   what ``tables.GENERATORS[NAME]`` makes from the results files (tables with their source,
   commit, date and machine).
   docs/configuration.md's key table is checked against ``CheckFreeConfig`` (``config_table``).
3. **Provenance.** Every results file a page links to is listed in a ``*.meta.json`` sidecar
   under ``benchmarks/results/`` that names its commit, date, machine, protocol and command.

And a lint: outside code, quoted figures and generated blocks, a page may not carry a decimal
number with a unit of time, a ratio's three decimals, or a percentage with decimals: write it
as a quoted figure, or as code when it is a setting rather than a measurement.
"""
from __future__ import annotations

import argparse
import csv
import glob
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(REPO, "benchmarks", "results")
META_KEYS = ("files", "benchmark", "command", "protocol", "date", "code_commit", "machine")
NUMBER = re.compile(r"[-+]?\d[\d,]*\.?\d*")
LINK = re.compile(r'\[([^\]]+)\]\(([^)\s]+)\s+"([^"]+)"\)')
ANY_RESULTS_LINK = re.compile(r"\]\(([^)\s]*benchmarks/results/[^)\s#]+)")
BLOCK = re.compile(r"<!-- generated: (\S+) -->\n(.*?)<!-- /generated -->", re.S)
UNMARKED = re.compile(r"(?<![\w.])\d+\.\d+ ?(?:s|ms|min|h|x|%|MB|GB)(?![\w])|(?<![\w.])[01]\.\d{3}(?![\w.])"
                      r"|(?<![\w.])\d+\.\d+ ?×")


def pages(root: str = REPO) -> list[str]:
    """README.md, CHANGELOG.md and every markdown page under docs/ (the pages a user reads)."""
    return ([os.path.join(root, "README.md"), os.path.join(root, "CHANGELOG.md")]
            + sorted(glob.glob(os.path.join(root, "docs", "*.md"))))


def _load(name: str):
    """A sibling module of this file (docs/tools is not a package: loaded by path)."""
    spec = importlib.util.spec_from_file_location(f"docs_tools_{name}", os.path.join(os.path.dirname(__file__),
                                                                                     name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------- cells
def numbers(text: str) -> list[str]:
    """The numbers written in ``text`` (thousands separators dropped, signs kept)."""
    return [n.replace(",", "").rstrip(".") for n in NUMBER.findall(text) if any(c.isdigit() for c in n)]


def _match(cell: str, cond: str) -> bool:
    key, _, want = cond.partition("~=") if "~=" in cond else cond.partition("=")
    return want.strip() in cell if "~=" in cond else cell.strip() == want.strip()


def _conds(spec: str) -> list[tuple[str, str]]:
    out = []
    for cond in (c.strip() for c in spec.split(" & ") if c.strip()):
        key = cond.split("~=")[0] if "~=" in cond else cond.split("=")[0]
        out.append((key.strip(), cond))
    return out


def csv_cell(path: str, selector: str) -> str:
    """The cell a CSV selector names; ValueError when it names none or several."""
    rows_spec, _, column = selector.rpartition(" @ ")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows_spec.strip().startswith("#"):
        hits = [rows[int(rows_spec.strip()[1:])]]
    else:
        conds = _conds(rows_spec)
        for key, _ in conds:
            if rows and key not in rows[0]:
                raise ValueError(f"no column {key!r} in {os.path.basename(path)} (columns: {list(rows[0])})")
        hits = [r for r in rows if all(_match(r[k], c) for k, c in conds)]
    if len(hits) != 1:
        raise ValueError(f"{len(hits)} rows of {os.path.basename(path)} match {rows_spec!r} (need exactly one)")
    if column.strip() not in hits[0]:
        raise ValueError(f"no column {column.strip()!r} in {os.path.basename(path)}")
    return hits[0][column.strip()]


def md_cell(path: str, selector: str) -> str:
    rows_spec, _, column = selector.rpartition(" @ ")
    conds = dict(_conds(rows_spec))
    with open(path, encoding="utf-8") as f:
        tables = _load("tables").md_tables(f.read())
    want = conds.get("table", "table=").split("=", 1)[1].strip()
    table = next((rows for head, rows in tables if want in head), None)
    if table is None:
        raise ValueError(f"no table under a heading containing {want!r} in {os.path.basename(path)}")
    header = table[0]
    if column.strip() not in header:
        raise ValueError(f"no column {column.strip()!r} in that table of {os.path.basename(path)} ({header})")
    row_cond = conds.get("row")
    hits = [r for r in table[1:] if row_cond and _match(r[0], row_cond)]
    if len(hits) != 1:
        raise ValueError(f"{len(hits)} rows match {row_cond!r} in {os.path.basename(path)} (need exactly one)")
    return hits[0][header.index(column.strip())]


def figure_agrees(text: str, cell: str, kind: str) -> bool:
    """CSV: the text's first number is the cell rounded to the text's decimals. Markdown: every
    number of the text appears in the cell."""
    shown = numbers(text)
    if not shown:
        return False
    if kind == "csv":
        try:
            value = float(cell)
        except ValueError:
            return shown[0] in numbers(cell)
        decimals = len(shown[0].split(".")[1]) if "." in shown[0] else 0
        return f"{value:.{decimals}f}" == f"{float(shown[0]):.{decimals}f}"
    have = numbers(cell)
    return all(n in have for n in shown)


# ---------------------------------------------------------------------------------------- checks
@dataclass
class Problem:
    page: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{os.path.relpath(self.page, REPO)}:{self.line}: {self.what}"


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _resolve(page: str, target: str) -> str:
    return os.path.normpath(os.path.join(os.path.dirname(page), target))


def check_quotes(page: str, text: str) -> tuple[list[Problem], int]:
    """Every quoted figure against its cell; returns (problems, figures checked)."""
    problems, checked = [], 0
    for m in LINK.finditer(text):
        shown, target, selector = m.groups()
        if "benchmarks/results/" not in target:
            continue
        path, where = _resolve(page, target), _line_of(text, m.start())
        checked += 1
        if "|" in selector:
            problems.append(Problem(page, where, f"quoted figure [{shown}]: a '|' in its title splits a table row; "
                                                 "join conditions with ' & '"))
            continue
        try:
            if not os.path.exists(path):
                raise ValueError(f"{target} does not exist")
            kind = "md" if path.endswith(".md") else "csv"
            cell = (md_cell if kind == "md" else csv_cell)(path, selector)
        except (ValueError, IndexError) as err:
            problems.append(Problem(page, where, f"quoted figure [{shown}]: {err}"))
            continue
        if not figure_agrees(shown, cell, kind):
            problems.append(Problem(page, where, f"quoted figure [{shown}] differs from {target} "
                                                 f"({selector!r} = {cell!r})"))
    return problems, checked


def meta_index(results: str = RESULTS) -> dict[str, str]:
    """results file (path relative to benchmarks/results) -> the sidecar that describes it."""
    out = {}
    for meta in sorted(glob.glob(os.path.join(results, "**", "*.meta.json"), recursive=True)):
        with open(meta, encoding="utf-8") as f:
            data = json.load(f)
        base = os.path.relpath(os.path.dirname(meta), results)
        for name in data.get("files", []):
            out[os.path.normpath(os.path.join(base, name))] = meta
    return out


def check_meta(results: str = RESULTS) -> list[str]:
    """Every sidecar names every provenance key, and every file it lists exists."""
    problems = []
    for meta in sorted(glob.glob(os.path.join(results, "**", "*.meta.json"), recursive=True)):
        with open(meta, encoding="utf-8") as f:
            data = json.load(f)
        rel = os.path.relpath(meta, REPO)
        problems += [f"{rel}: missing {k!r}" for k in META_KEYS if not data.get(k)]
        problems += [f"{rel}: lists {name}, which does not exist" for name in data.get("files", [])
                     if not os.path.exists(os.path.join(os.path.dirname(meta), name))]
    return problems


def check_provenance(page: str, text: str, index: dict[str, str]) -> list[Problem]:
    problems = []
    for m in ANY_RESULTS_LINK.finditer(text):
        path = _resolve(page, m.group(1))
        rel = os.path.relpath(path, RESULTS)
        if os.path.isdir(path):
            continue
        if rel not in index:
            problems.append(Problem(page, _line_of(text, m.start()), f"{m.group(1)}: no *.meta.json sidecar "
                                    "lists it (commit, date, machine, protocol)"))
    return problems


def strip_exempt(text: str) -> str:
    """The text with code, quoted figures, generated blocks and comments blanked (same length)."""
    def blank(m):
        return re.sub(r"[^\n]", " ", m.group(0))
    for pattern in (BLOCK, re.compile(r"```.*?```", re.S), re.compile(r"`[^`\n]*`"), LINK,
                    re.compile(r"<!--.*?-->", re.S), re.compile(r"\]\([^)]*\)")):
        text = pattern.sub(blank, text)
    return text


def check_unmarked(page: str, text: str) -> list[Problem]:
    bare = strip_exempt(text)
    return [Problem(page, _line_of(bare, m.start()), f"unmarked figure {m.group(0)!r}: quote it from its results "
                    "file, or write a setting as code") for m in UNMARKED.finditer(bare)]


def render_blocks(text: str, generators: dict) -> tuple[str, list[str]]:
    """``text`` with every generated block rewritten; and the names of unknown generators."""
    unknown = []

    def fill(m):
        name = m.group(1)
        if name not in generators:
            unknown.append(name)
            return m.group(0)
        return f"<!-- generated: {name} -->\n{generators[name]().rstrip()}\n<!-- /generated -->"
    return BLOCK.sub(fill, text), unknown


def check_all(root: str = REPO) -> tuple[list[str], int]:
    """Every problem of every page (empty when the docs agree with the results); and how many
    quoted figures and generated blocks were checked."""
    generators = _load("tables").GENERATORS
    index, problems, count = meta_index(), list(check_meta()), 0
    for page in pages(root):
        if not os.path.exists(page):
            continue
        with open(page, encoding="utf-8") as f:
            text = f.read()
        quoted, n = check_quotes(page, text)
        count += n + len(BLOCK.findall(text))
        problems += [str(p) for p in quoted + check_provenance(page, text, index) + check_unmarked(page, text)]
        rendered, unknown = render_blocks(text, generators)
        problems += [f"{os.path.relpath(page, REPO)}: unknown generated block {u!r}" for u in unknown]
        fresh = dict(BLOCK.findall(rendered))
        problems += [f"{os.path.relpath(page, REPO)}: generated block {name!r} is out of date with its source "
                     "(run: python docs/tools/figures.py --write)"
                     for name, body in BLOCK.findall(text) if name in fresh and fresh[name] != body]
    config_page = os.path.join(root, "docs", "configuration.md")
    if os.path.exists(config_page):
        with open(config_page, encoding="utf-8") as f:
            problems += _load("config_table").check(f.read())
    return problems, count


def write_all(root: str = REPO) -> list[str]:
    generators, changed = _load("tables").GENERATORS, []
    for page in pages(root):
        with open(page, encoding="utf-8") as f:
            text = f.read()
        rendered, _ = render_blocks(text, generators)
        if page.endswith(os.path.join("docs", "configuration.md")):
            rendered = _load("config_table").fix(rendered)
        if rendered != text:
            with open(page, "w", encoding="utf-8") as f:
                f.write(rendered)
            changed.append(os.path.relpath(page, REPO))
    return changed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="regenerate the generated blocks, then check")
    a = p.parse_args(argv)
    if a.write:
        for page in write_all():
            print("rewrote", page)
    problems, count = check_all()
    for line in problems:
        print(line)
    print(f"{count} quoted figures and generated blocks checked; {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
