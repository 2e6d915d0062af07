"""One figure per fact: the figures in README.md, CHANGELOG.md and docs/ against the results
files they cite (docs/tools/figures.py), and the mechanism itself on pages made to be wrong."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys

import pytest

from conftest import ROOT


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_tools_{name}", ROOT / "docs" / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


figures = _load("figures")
config_table = _load("config_table")
RESULTS = ROOT / "benchmarks" / "results"
KILL = "phase=total: kill -> next completed step @ value"


def test_every_page_agrees_with_its_results_files():
    """The repository's own pages: every quoted figure equals its cell, every generated table is
    current, every cited results file has its sidecar, no measured-looking number is unsourced,
    the configuration table matches the dataclass. Fix: python docs/tools/figures.py --write."""
    problems, checked = figures.check_all()
    assert not problems, "\n".join(problems)
    assert checked >= 40  # the pages really quote figures (a checker that finds nothing cannot fail)


def _page(tmp_path, body: str):
    page = tmp_path / "page.md"
    page.write_text(body)
    return str(page), body


def test_a_quoted_figure_that_differs_from_its_cell_is_reported(tmp_path):
    csv = RESULTS / "real_failure_coordinator.csv"
    page, text = _page(tmp_path, f'right [0.239 s]({csv} "{KILL}"), rounded [0.24 s]({csv} "{KILL}"), '
                                 f'wrong [0.25 s]({csv} "{KILL}")\n')
    problems, checked = figures.check_quotes(page, text)
    assert checked == 3
    assert len(problems) == 1 and "[0.25 s] differs" in str(problems[0]) and "0.239" in str(problems[0])


def test_selectors_that_name_no_single_cell_are_reported(tmp_path):
    csv = RESULTS / "real_failure_preempt.csv"
    page, text = _page(tmp_path, f'[1 s]({csv} "phase~=total @ value") [1 s]({csv} "nope=1 @ value") '
                                 f'[1 s]({csv} "phase=x | strategy=y @ value")\n')
    problems, _ = figures.check_quotes(page, text)
    assert "rows of real_failure_preempt.csv match" in str(problems[0])  # several rows hold a total
    assert "no column 'nope'" in str(problems[1])
    assert "splits a table row" in str(problems[2])


def test_a_markdown_cell_needs_every_number_of_the_figure(tmp_path):
    md = RESULTS / "convergence.md"
    sel = "table=Summary across rates & row=CheckFree, all stages fail (fallback ckpt/25) @ 10 %/h"
    page, text = _page(tmp_path, f'[372 ± 42 / 55.4]({md} "{sel}") [372 ± 42 / 55.5]({md} "{sel}")\n')
    problems, checked = figures.check_quotes(page, text)
    assert checked == 2 and len(problems) == 1 and "[372 ± 42 / 55.5]" in str(problems[0])


def test_unmarked_figures_are_found_outside_code_and_quotes(tmp_path):
    csv = RESULTS / "step_time.csv"
    page, text = _page(tmp_path, "took 0.24 s and ran 1.058x, ratio 1.000\n"
                                 f"`heartbeat_interval_s` is `0.5` s; [1.000]({csv} \"variant=checkfree @ ratio_vs_stock\")\n"
                                 "```\n12.5 s in a code block\n```\n4 stages, 60 steps, issue #14\n")
    found = [p.what.split("'")[1] for p in figures.check_unmarked(page, text)]
    assert found == ["0.24 s", "1.058x", "1.000"]


def test_a_results_link_without_a_sidecar_is_reported(tmp_path):
    page, text = _page(tmp_path, f"see [the runs]({RESULTS / 'convergence_runs.csv'})\n")
    assert figures.check_provenance(page, text, figures.meta_index()) == []
    problems = figures.check_provenance(page, text, {})
    assert len(problems) == 1 and "no *.meta.json sidecar" in str(problems[0])


def test_every_sidecar_names_commit_date_machine_and_protocol():
    assert figures.check_meta() == []
    for meta in RESULTS.rglob("*.meta.json"):
        data = json.loads(meta.read_text())
        assert all(data.get(k) for k in figures.META_KEYS), meta


def test_a_hand_edited_generated_block_is_stale():
    tables = figures._load("tables")
    fresh = f"<!-- generated: recovery -->\n{tables.recovery()}\n<!-- /generated -->\n"
    assert figures.render_blocks(fresh, tables.GENERATORS) == (fresh, [])
    edited = fresh.replace("0.0074 ± 0.0026", "0.0050 ± 0.0026")
    assert edited != fresh and figures.render_blocks(edited, tables.GENERATORS)[0] == fresh
    assert figures.render_blocks("<!-- generated: nope -->\nx\n<!-- /generated -->", {})[1] == ["nope"]


def test_the_configuration_table_follows_the_dataclass():
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert config_table.check(text) == []
    mode_row = next(line for line in text.splitlines() if line.startswith("| `mode` |"))
    broken = text.replace(mode_row, mode_row.replace('`"redundant"`', "the baseline"))
    assert any("allowed value(s) ['redundant']" in p for p in config_table.check(broken))
    wrong_default = text.replace('| `lr_scale` | number | `1.1` |', '| `lr_scale` | number | `1.2` |')
    assert any("`lr_scale` says" in p for p in config_table.check(wrong_default))
    dropped = "\n".join(line for line in text.splitlines() if not line.startswith("| `spares` |"))
    assert "docs/configuration.md: no row for the field `spares`" in config_table.check(dropped)
    fixed = config_table.fix(dropped)
    assert "| `spares` | integer | `0` | (describe it) |" in fixed
    assert any("placeholder" in p for p in config_table.check(fixed))


def test_versions_agree():
    """The changelog's newest version is the package's (setup.py and ``ds_checkfree.__version__``)
    and the citation's."""
    import ds_checkfree
    changelog = re.search(r"^## (\d+\.\d+\.\d+)", (ROOT / "CHANGELOG.md").read_text(), re.M).group(1)
    setup = re.search(r'version="([^"]+)"', (ROOT / "setup.py").read_text()).group(1)
    citation = re.search(r"^version: (\S+)", (ROOT / "CITATION.cff").read_text(), re.M).group(1)
    assert changelog == setup == citation == ds_checkfree.__version__


def test_the_convergence_figures_redraw_from_committed_files(tmp_path):
    """No run cache: the committed curve CSV, run CSV and sidecar are enough for both figures."""
    plots = importlib.util.module_from_spec(spec := importlib.util.spec_from_file_location(
        "convergence_plots", ROOT / "benchmarks" / "convergence_plots.py"))
    spec.loader.exec_module(plots)
    for ext in (".csv", "_runs.csv", ".meta.json"):
        shutil.copy(RESULTS / f"convergence_quick{ext}", tmp_path / f"q{ext}")
    written = plots.draw(str(tmp_path / "q"))
    assert [p.rsplit("/", 1)[1] for p in written] == ["q.png", "q_bars.png"]
    assert all((tmp_path / name).stat().st_size > 10_000 for name in ("q.png", "q_bars.png"))
    runs = plots.read_csv(str(tmp_path / "q_runs.csv"))
    meta = json.loads((tmp_path / "q.meta.json").read_text())
    assert {r["strategy"] for r in runs} <= set(meta["modelled_wall"]["strategies"])
    # a point's modelled time is the harness's own model: the reference reaches the target at its
    # modelled wall-clock to target (interpolated between validations, so the nearest points bracket it)
    ref = next(r for r in runs if r["strategy"] == "no_failure")
    xs = [plots.modelled_x(p, meta) for p in plots.read_csv(str(tmp_path / "q.csv")) if p["strategy"] == "no_failure"]
    target = float(ref["modelled_wall_to_target_s"])
    assert min(xs) < target < max(xs)


@pytest.mark.parametrize("name", ["README.md", "CHANGELOG.md", "LICENSE", "CITATION.cff"])
def test_project_files_exist(name):
    text = (ROOT / name).read_text()
    assert len(text) > 500
    if name == "LICENSE":
        assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS" in text
    if name == "README.md":
        assert len(text.splitlines()) < 200
        assert "bash scripts/test.sh" in text and "deepspeed --num_gpus 4 launch/train.py" in text
        assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()  # CI runs the README's command
