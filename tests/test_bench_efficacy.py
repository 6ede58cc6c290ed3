"""The evidence harness (bench/efficacy.py): flags parsed as trained, runs keyed by their settings, and the
selection rule fixed in code before the final runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
common = efficacy = None  # the bench modules, imported by `bench_modules`


@pytest.fixture(autouse=True, scope="module")
def bench_modules():
    """``common`` and ``efficacy`` from bench/, with sys.path as it was afterwards (other tests import by name)."""
    saved = list(sys.path)
    sys.path.insert(0, str(BENCH))
    import common
    import efficacy

    globals().update(common=common, efficacy=efficacy)
    yield
    sys.path[:] = saved


@pytest.mark.parametrize(
    "text", ["--cd_strength 100 --cd_kinds ffn,value_output", "--cd_strength 100 --cd_kinds ffn value_output"]
)
def test_final_cd_kinds_in_either_form_are_the_kinds_trained_with(text):
    flags, kinds, values = efficacy.parse_final_cd(text)
    assert kinds == ("ffn", "value_output")
    assert flags == ("--cd_strength", "100", "--cd_kinds", "ffn", "value_output")
    assert values == {"--cd_strength": "100"}
    final = efficacy.pretrained_suite("pretrained_final", None, 0.01, text)
    cd = next(m for m in final if m.method == "cd")
    assert cd.cd_kinds == ("ffn", "value_output") and cd.cd_strength == 100
    wd = next(m for m in final if m.method == "baseline_wd")
    assert "--weight_decay" in wd.flags and wd.flags[wd.flags.index("--weight_decay") + 1] == "100"


@pytest.mark.parametrize("text", ["100 --cd_kinds ffn", "--cd_strength", "--cd_strength 1 2"])
def test_malformed_final_cd_is_refused_with_the_reason(text):
    with pytest.raises(SystemExit):
        efficacy.parse_final_cd(text)


def test_a_run_key_changes_with_the_flags_and_the_evaluation():
    a = efficacy.cd("x", 100)
    b = efficacy.cd("x", 300)
    key_a = efficacy.method_key(a, "m", 0, "pretrained-cpu", 2)
    assert key_a != efficacy.method_key(b, "m", 0, "pretrained-cpu", 2)
    record = {"name": "x", "model": "m", "seed": 0, "scale": "pretrained-cpu", "flags": list(a.flags),
              "evaluation": efficacy.EVALUATION_VERSION, "threads": 2}  # fmt: skip
    assert efficacy.run_key(record) == key_a
    assert efficacy.run_key({**record, "evaluation": "older"}) != key_a
    assert efficacy.run_key({**record, "threads": 1}) != key_a  # the thread count changes the trained weights


def _record(name, method, seed, fp, score, flags=()):
    rows = [{"pipeline": p, "w_bits": w, "a_bits": a, "acc": score}
            for p in ("percentile", "gptaq") for w, a in efficacy.PRETRAINED_SELECTION_BITS]  # fmt: skip
    return {"name": name, "method": method, "seed": seed, "scale": "pretrained-cpu", "val_fp_acc": fp,
            "val_quant": rows, "flags": list(flags), "evaluation": efficacy.EVALUATION_VERSION,
            "threads": efficacy.PRETRAINED_THREADS}  # fmt: skip


def test_selection_takes_the_best_validation_score_within_the_fp_margin():
    records = [_record("baseline", "baseline", s, 85.0, 70.0) for s in (0, 1)]
    records += [_record("cd_a", "cd", s, 84.9, 72.0) for s in (0, 1)]  # within 0.2 of the baseline's FP
    records += [_record("cd_b", "cd", s, 84.5, 80.0) for s in (0, 1)]  # best score, but FP too low
    records += [_record("cd_c", "cd", 0, 86.0, 90.0)]  # one seed: not enough against two
    records += [_record("tweo_x", "tweo", s, 85.0, 71.0, ("--tweo_weight", "0.01")) for s in (0, 1)]
    records += [{**_record("cd_d", "cd", 0, 90.0, 99.0), "evaluation": "older"}]  # another measurement
    records += [
        {**_record("cd_e", "cd", s, 90.0, 99.0), "threads": 1} for s in (0, 1)
    ]  # another thread count
    chosen = efficacy.select_final(records)
    assert chosen["cd"]["name"] == "cd_a" and chosen["cd"]["seeds"] == [0, 1]
    assert chosen["tweo"]["name"] == "tweo_x"
    assert chosen["cd"]["baseline_score"] == pytest.approx(70.0)


def test_a_name_recorded_with_other_flags_is_refused():
    records = [_record("cd_plain_100", "cd", 0, 85.0, 70.0, ("--cd_strength", "100"))]
    with pytest.raises(SystemExit, match="cd_plain_100"):
        efficacy.check_names([efficacy.cd("cd_plain_100", 300)], records)
    efficacy.check_names([efficacy.Method("cd", "cd_plain_100", ("--cd_strength", "100"))], records)


def test_records_under_bench_results_do_not_make_the_tree_dirty(tmp_path):
    repo = tmp_path / "repo"
    (repo / "bench" / "results").mkdir(parents=True)
    (repo / "src").mkdir()
    for path in ("bench/results/efficacy.json", "src/code.py"):
        (repo / path).write_text("0\n")
    identity = ("-c", "user.email=a@b", "-c", "user.name=n")
    for args in (("init", "-q"), (*identity, "add", "."), (*identity, "commit", "-qm", "init")):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)
    bench = repo / "bench"
    (bench / "results" / "efficacy.json").write_text("1\n")
    assert not common.tree_is_dirty(bench)
    common.require_clean_tree(cwd=bench)
    (repo / "src" / "code.py").write_text("1\n")
    assert common.tree_is_dirty(bench)
    with pytest.raises(SystemExit, match="--allow-dirty"):
        common.require_clean_tree(cwd=bench)
    common.require_clean_tree(allow_dirty=True, cwd=bench)


def test_report_reads_and_writes_beside_the_records_file_it_is_given(tmp_path):
    records = tmp_path / "elsewhere" / "efficacy.json"
    records.parent.mkdir()
    records.write_text("[]\n")
    subprocess.run([sys.executable, str(BENCH / "efficacy.py"), "--report", "--records", str(records)], check=True,
                   capture_output=True)  # fmt: skip
    assert "No runs recorded yet." in records.with_suffix(".md").read_text()


def _final_record(name, method, seed, fp, score, flags=()):
    """A record with test rows too: the validation rows score ``score``, the test rows ``score + seed noise``."""
    record = _record(name, method, seed, fp, score, flags)
    rows = [{**row, "acc": row["acc"] + 0.1 * seed} for row in record["val_quant"]]
    return {**record, "fp_acc": fp, "quant": rows}


def _final_set(cd_score, cd_fp=85.0, seeds=(0, 1, 2), cd_noise=0.0):
    records = [_final_record("baseline", "baseline", s, 85.0, 70.0) for s in seeds]
    records += [_final_record("tweo_x", "tweo", s, 85.0, 71.0, ("--tweo_weight", "0.01")) for s in seeds]
    records += [_final_record("cd_a", "cd", s, cd_fp, cd_score + cd_noise * (-1) ** s) for s in seeds]
    return records


def test_the_verdict_follows_the_rule_written_before_the_final_numbers():
    assert efficacy.verdict(_final_set(75.0, seeds=(0, 1)))["status"] == "incomplete"  # 2 of 3 seeds
    helps = efficacy.verdict(_final_set(75.0))
    assert helps["status"] == "cd_helps" and helps["names"]["cd"] == "cd_a"
    assert helps["bits"]["W4A4"]["cd_minus"]["tweo"]["mean"] == pytest.approx(4.0)
    # better than the baseline but not than TWEO: no
    assert efficacy.verdict(_final_set(70.5))["status"] == "cd_does_not_help"
    # a full-precision cost beyond the margin: no, however good the quantized rows (validation FP is
    # within the margin, so the selection keeps it; test FP is what the verdict reads)
    worse_fp = _final_set(75.0)
    for record in worse_fp:
        if record["name"] == "cd_a":
            record["fp_acc"] = 84.7
    assert efficacy.verdict(worse_fp)["status"] == "cd_does_not_help"
    # a lead within two standard errors at 3 seeds asks for 5 seeds; at 5 seeds the means decide
    assert efficacy.verdict(_final_set(71.5, cd_noise=3.0))["status"] == "extend"
    five = efficacy.verdict(_final_set(71.5, cd_noise=3.0, seeds=range(5)))
    assert five["status"] in ("cd_helps", "cd_does_not_help") and five["close"]
    lines = "\n".join(efficacy.verdict_lines(helps))
    assert "beats the baseline and TWEO" in lines and "| W4A4 |" in lines


def test_the_final_set_reuses_the_chosen_cd_run_by_name():
    flags = "--cd_strength 100 --cd_mode plain --cd_kinds ffn value_output"
    methods = efficacy.pretrained_suite("pretrained_final", None, 0.1, flags, "cd_plain_100")
    assert [m.name for m in methods] == ["baseline", "wd100", "tweo_w0.1", "cd_plain_100"]
    assert methods[-1].flags == efficacy.cd("cd_plain_100", 100).flags  # the round-two run's key


def test_readme_and_method_say_what_the_committed_records_say():
    """The verdict blocks are generated (`--report --sync-docs`); hand edits or stale records fail here."""
    block = efficacy.verdict_markdown(efficacy.load_records())
    for path in efficacy.VERDICT_DOCS:
        text = path.read_text()
        prefix = "../" * len(path.parent.relative_to(efficacy.ROOT).parts)
        assert efficacy.with_verdict_block(text, block, prefix) == text, (
            f"{path.name}'s verdict block is stale: python bench/efficacy.py --report --sync-docs"
        )
    assert efficacy.CARD_EVIDENCE.read_text() == efficacy.card_evidence(efficacy.load_records()), (
        "the card's evidence block is stale: python bench/efficacy.py --report --sync-docs"
    )


def test_the_verdict_block_is_rewritten_in_place_and_only_there():
    text = f"intro\n{efficacy.VERDICT_BEGIN}\nold\n{efficacy.VERDICT_END}\noutro\n"
    new = efficacy.with_verdict_block(text, "see [x](bench/results/efficacy.md)", "../")
    assert (
        new
        == f"intro\n{efficacy.VERDICT_BEGIN}\nsee [x](../bench/results/efficacy.md)\n{efficacy.VERDICT_END}\noutro\n"
    )
    with pytest.raises(SystemExit, match="block"):
        efficacy.with_verdict_block("no markers", "x")
    records = _final_set(75.0)
    for record in records:
        record["outlier_profile"] = {"residual_max": [1.0, 2.0 + record["seed"]]}
        record["flags"] = ["--cd_strength", "100"] if record["method"] == "cd" else record["flags"]
    markdown = efficacy.verdict_markdown(records)
    assert "beats the baseline and TWEO" in markdown and "| cd_a | 3 |" in markdown
    assert "| baseline | 3 | 85.00 ± 0.00 |" in markdown and "3.00 ± 0.58 |" in markdown  # residual 2, 3, 4


def test_the_card_carries_the_verdict_only_once_decided_with_links_that_work_on_the_hub():
    records = _final_set(75.0)
    for record in records:
        record["outlier_profile"] = {"residual_max": [1.0, 2.0]}
        record["flags"] = ["--cd_strength", "100"] if record["method"] == "cd" else record["flags"]
    card = efficacy.card_evidence(records)
    assert (
        "beats the baseline and TWEO" in card and "](https://github.com/hf-cd/hf-cd/blob/main/bench/" in card
    )
    assert "](bench/" not in card
    assert efficacy.card_evidence(records[:-1]) == ""  # two CD seeds: no verdict, no block


def test_a_form_far_below_the_baseline_on_validation_is_not_run_at_later_seeds():
    records = [_record("baseline", "baseline", 0, 85.0, 70.0), _record("cd_bad", "cd", 0, 84.0, 67.5),
               _record("cd_close", "cd", 0, 85.0, 68.5), _record("wd100", "baseline_wd", 0, 80.0, 60.0)]  # fmt: skip
    bad, close = efficacy.cd("cd_bad", 300), efficacy.cd("cd_close", 300)
    assert "-2.50" in efficacy.pruned(bad, 1, records)
    assert efficacy.pruned(bad, 0, records) is None  # its first seed itself runs
    assert efficacy.pruned(close, 1, records) is None  # -1.5: within the margin
    assert efficacy.pruned(efficacy.Method("baseline_wd", "wd100"), 1, records) is None  # controls always run
    assert efficacy.pruned(efficacy.cd("cd_new", 100), 1, records) is None  # nothing recorded yet


def test_the_final_set_plot_draws_every_pipeline_and_the_outlier_profile(tmp_path):
    def run(name, seed, acc):
        rows = [{"pipeline": p, "w_bits": b[0], "a_bits": b[1], "acc": acc + seed}
                for p, b, _ in efficacy.pretrained_rows()]  # fmt: skip
        return {"name": name, "seed": seed, "fp_acc": 85.0, "quant": rows,
                "outlier_profile": {"residual_max": [1.0 + block + seed for block in range(12)]}}  # fmt: skip

    runs = {name: [run(name, s, acc) for s in range(4)] for name, acc in (("baseline", 70.0), ("cd_a", 71.0))}
    name = efficacy._plot_final(runs, [0, 1, 2], tmp_path)  # seed 3 is not the verdict's: left out
    assert name == "efficacy-final.png" and (tmp_path / name).stat().st_size > 0
