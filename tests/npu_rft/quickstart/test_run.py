"""Tests for the quickstart pipeline: its data files, a smoke-size run through
every stage, the warm-up cache, and (slow) the full run against its targets."""
from __future__ import annotations

import dataclasses
import json

import pytest

from npu_rft.data.schema import read_examples
from npu_rft.quickstart import run as qr
from npu_rft.quickstart import sample_data as sd


def test_make_data_writes_the_four_files(tmp_path):
    options = qr.QuickstartOptions.smoke(train_cases=20, eval_cases=6, format_rows=10)
    paths = qr.make_data(options, tmp_path)
    train, evals = read_examples(paths["train"]), read_examples(paths["eval"])
    assert (len(train), len(evals)) == (20, 6)
    assert {ex.id for ex in train}.isdisjoint(ex.id for ex in evals)
    for ex in train + evals:
        assert ex.system == qr.SYSTEM
        assert ex.context.startswith("Rank the candidate diseases") and "\nExplicit symptoms: [[" in ex.context
        assert ex.context.endswith(f"\nCandidate diseases: {ex.meta['candidates']}")
        assert ex.target in ex.meta["candidates"] and ex.meta["department"] == sd.DEPARTMENT_OF[ex.target]
    facts = read_examples(paths["facts"], allow_text=True)
    assert [ex.text for ex in facts] == sd.fact_corpus(seed=options.seed)
    formats = read_examples(paths["format"])
    cases = sd.mismatched_cases(10, seed=options.seed + 1)
    for ex, case in zip(formats, cases):
        ranking = json.loads(ex.target)["possible_diseases"]
        assert sorted(ranking) == sorted(case["candidate_diseases"])
        assert f"Candidate diseases: {case['candidate_diseases']}" in ex.context
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cases.json", "eval.jsonl", "facts.jsonl", "format.jsonl", "format_cases.json", "template_en.txt", "train.jsonl"]


def test_options_are_checked():
    with pytest.raises(ValueError, match="num_samples"):
        qr.QuickstartOptions(num_samples=1)
    with pytest.raises(ValueError, match="grpo_steps"):
        qr.QuickstartOptions.smoke(grpo_steps=0)


def test_format_rows_default_to_one_fresh_row_per_warmup_draw():
    options = qr.QuickstartOptions(warmup_steps=10, warmup_rows_per_step=3)
    assert options.format_rows is None and options.num_format_rows == 30
    assert qr.QuickstartOptions(format_rows=7).num_format_rows == 7
    with pytest.raises(ValueError, match="format_rows"):
        qr.QuickstartOptions(format_rows=0)


def test_smoke_run_goes_through_every_stage_and_reuses_the_warmup(tmp_path, monkeypatch):
    out, cache = tmp_path / "qs", tmp_path / "cache"
    options = qr.QuickstartOptions.smoke(out_dir=str(out), cache_dir=str(cache))
    result = qr.run_quickstart(options)
    assert set(result.timings_s) == {"data", "tiny_model", "warmup", "eval_before", "grpo", "eval_after", "total"}
    assert result.after["num_cases"] == 8
    for system, figures in (("base__warm-up_", result.before), ("after_GRPO", result.after)):
        # Top@1 recomputed from the written predictions (greedy: one per case):
        # a hit is a parsed ranking whose first entry is the target.
        rows = [json.loads(line) for line in (out / f"predictions-{system}.jsonl").read_text().splitlines()]
        assert len(rows) == 8
        hits = [r["parsed"] is not None and r["parsed"][:1] == [r["target"].strip().casefold()] for r in rows]
        assert figures["top1"] == pytest.approx(sum(hits) / len(hits))
    assert set(result.baselines) == {"keep_order", "prior", "chance"}
    assert result.curves == out / "grpo" / "curves.png" and result.curves.is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["base (warm-up)", "after GRPO", "keep_order", "prior", "chance"]
    assert (out / "report.md").read_text() == result.report
    summary = json.loads((out / qr.MARKER).read_text())
    assert summary["status"] == "completed" and summary["after"] == result.after
    assert len(list((cache / "quickstart-warmup").iterdir())) == 1

    # A second run replaces the output and takes the warm-up from the cache; so does
    # a run into another output directory.
    from npu_rft import trainer

    algorithms = []
    real_fit = trainer.fit
    monkeypatch.setattr(trainer, "fit", lambda config, resume=None: algorithms.append(config.algorithm) or real_fit(config))
    again = qr.run_quickstart(options)
    assert algorithms == ["grpo"]
    assert again.before == result.before and again.after == result.after  # seeded end to end
    elsewhere = qr.run_quickstart(dataclasses.replace(options, out_dir=str(tmp_path / "qs2")))
    assert algorithms == ["grpo", "grpo"]
    assert elsewhere.before == result.before


def test_a_foreign_output_directory_is_left_alone(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a quickstart output"):
        qr.run_quickstart(qr.QuickstartOptions.smoke(out_dir=str(tmp_path), cache_dir=str(tmp_path / "c")))
    assert (tmp_path / "mine.txt").read_text() == "keep"


@pytest.mark.slow
def test_full_quickstart_meets_its_targets(tmp_path):
    result = qr.run_quickstart(qr.QuickstartOptions(out_dir=str(tmp_path / "qs"), cache_dir=str(tmp_path / "cache")))
    chance = result.baselines["chance"]["top1"]
    assert abs(result.before["top1"] - chance) < 0.15  # the warmed-up base ranks at about chance
    assert result.before["format_failure_rate"] == 0.0
    assert result.after["top1"] - result.before["top1"] >= 0.30
    assert result.after["format_failure_rate"] == 0.0
