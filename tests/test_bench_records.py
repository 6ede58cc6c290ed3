"""Benchmark records come from a clean tree, and the records the docs cite exist."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


@pytest.fixture
def common(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import common

    return common


def test_a_benchmark_refuses_a_dirty_tree_before_any_work_unless_told(common, monkeypatch):
    monkeypatch.setattr(common, "tree_is_dirty", lambda cwd=None: True)
    with pytest.raises(SystemExit, match="--allow-dirty"):
        common.parse_checked(argparse.ArgumentParser(), [])
    assert common.parse_checked(argparse.ArgumentParser(), ["--allow-dirty"]).allow_dirty
    monkeypatch.setattr(common, "tree_is_dirty", lambda cwd=None: False)
    assert not common.parse_checked(argparse.ArgumentParser(), []).allow_dirty


def test_every_benchmark_that_writes_a_record_checks_the_tree():
    for script in sorted(BENCH.glob("*.py")):
        text = script.read_text()
        writes_a_record = "from common import" in text and "ArgumentParser(" in text
        if writes_a_record:
            assert "parse_checked(" in text or "require_clean_tree(" in text, script.name


CITED = re.compile(r"(?:bench/results|\.\./bench/results)/([\w.\-*]+\.(?:md|json|png))")


@pytest.mark.parametrize(
    "document",
    [
        "README.md",
        "recipes/README.md",
        "docs/method.md",
        *[str(p.relative_to(ROOT)) for p in (ROOT / "recipes" / "configs").glob("*.yaml")],
    ],
)
def test_every_record_a_document_cites_exists(document):
    text = (ROOT / document).read_text()
    for name in CITED.findall(text):
        matches = list((BENCH / "results").glob(name))
        assert matches, f"{document} cites bench/results/{name}, which does not exist"


def test_syspath_is_restored():  # the fixture above must not leak `common` into other tests' imports
    assert str(BENCH) not in sys.path
