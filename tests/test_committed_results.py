"""The committed result tables are what their run files give: every ``seqnorm-lm compare --summarize`` command
that README.md, docs/results.md or docs/gru.md prints, run on a copy of its folder, writes the committed ``results.md`` and
``results.json`` byte for byte (nothing is trained: the runs are read back from their ``summary.json``), and
the README's results table is that folder's table.  No copy of PTB is needed: the runs are matched to it by
its SHA-256.  Likewise ``benchmarks/robust_start_grid.py --summarize`` writes each committed grid ``table.md``
from its runs' ``start.json`` digests, and docs/robust_start.md shows what it writes."""
import importlib.util
import re
import shutil

import pytest

from lm.cli import main
from lm_helpers import REPO

COMMAND = re.compile(r"^\s+seqnorm-lm compare --summarize (?P<args>.*) --out docs/results/(?P<folder>\S+)$", re.M)
README = (REPO / "README.md").read_text()
DOCS = [README] + [(REPO / "docs" / name).read_text() for name in ("results.md", "gru.md")]
PRINTED = {m["folder"]: m["args"].split() for text in DOCS for m in COMMAND.finditer(text)}
PRINTED_IN_README = [m["folder"] for m in COMMAND.finditer(README)]


def test_the_docs_print_the_summarize_commands():
    assert {"compare_6epochs", "compare_full", "gru_compare_3epochs", "gru_none_3seeds_3epochs"} <= set(PRINTED)
    assert len(PRINTED_IN_README) == 1


def test_the_readme_shows_the_table_its_command_writes():
    table = (REPO / "docs" / "results" / PRINTED_IN_README[0] / "results.md").read_text().split("\n\n")[0]
    assert table.startswith("| cell: lr") and "\n" + table + "\n\n" in README


@pytest.mark.parametrize("folder, args", PRINTED.items(), ids=list(PRINTED))
def test_a_printed_summarize_command_regenerates_its_committed_tables(folder, args, tmp_path):
    committed = REPO / "docs" / "results" / folder
    copy = tmp_path / folder
    shutil.copytree(committed, copy, ignore=shutil.ignore_patterns("results.*", "valid_ppl.png"))
    no_ptb = tmp_path / "no-ptb-here"
    assert main(["compare", "--summarize", *args, "--out", str(copy), "--data", str(no_ptb), "--no-progress"]) == 0
    for name in ("results.md", "results.json"):
        assert (copy / name).read_text() == (committed / name).read_text(), f"{folder}/{name} differs from its runs"


def _grid_script():
    spec = importlib.util.spec_from_file_location("robust_start_grid", REPO / "benchmarks" / "robust_start_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GRIDS = {"robust_start_grid": [], "robust_start_grid_other_cpu": ["--against", "docs/results/robust_start_grid"]}


@pytest.mark.parametrize("folder, against", GRIDS.items(), ids=list(GRIDS))
def test_the_robust_start_grid_tables_are_what_their_run_digests_give(folder, against, tmp_path, monkeypatch):
    committed = REPO / "docs" / "results" / folder
    copy = tmp_path / folder
    shutil.copytree(committed, copy, ignore=shutil.ignore_patterns("table.md"))
    monkeypatch.chdir(REPO)  # --against is given relative to the checkout, as docs/robust_start.md prints it
    _grid_script().main(["--out", str(copy), "--summarize", *against])
    assert (copy / "table.md").read_text() == (committed / "table.md").read_text()


def test_the_robust_start_page_shows_the_grid_tables():
    """The default numerics' table whole; of the other CPU's (linked), its verdict per preset."""
    page = (REPO / "docs" / "robust_start.md").read_text()
    table = (REPO / "docs" / "results" / "robust_start_grid" / "table.md").read_text()
    other = (REPO / "docs" / "results" / "robust_start_grid_other_cpu" / "table.md").read_text()
    assert "\n" + table + "\n" in page
    assert "\n" + other.split("\n\n")[1] + "\n" in page and "(results/robust_start_grid_other_cpu/table.md)" in page
