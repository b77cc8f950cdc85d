"""Tests for the quickstart pipeline: its data files, a smoke-size run through
every stage, the warm-up cache, and (slow) the full run against its targets."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

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
    with pytest.raises(ValueError, match="algorithm='ppo': choose one of grpo, dpo, both"):
        qr.QuickstartOptions(algorithm="ppo")
    with pytest.raises(ValueError, match="dpo_beta"):
        qr.QuickstartOptions(dpo_beta=0)
    with pytest.raises(ValueError, match="dpo_epochs"):
        qr.QuickstartOptions(dpo_epochs=0)
    with pytest.raises(ValueError, match="dpo_nll_weight"):
        qr.QuickstartOptions(dpo_nll_weight=-1.0)
    with pytest.raises(ValueError, match="dpo_tie_break='longest': choose first or length"):
        qr.QuickstartOptions(dpo_tie_break="longest")
    with pytest.raises(ValueError, match="grpo_steps"):
        qr.QuickstartOptions.smoke(grpo_steps=0)


def test_format_rows_default_to_one_fresh_row_per_warmup_draw():
    options = qr.QuickstartOptions(warmup_steps=10, warmup_rows_per_step=3)
    assert options.format_rows is None and options.num_format_rows == 30
    assert qr.QuickstartOptions(format_rows=7).num_format_rows == 7
    with pytest.raises(ValueError, match="format_rows"):
        qr.QuickstartOptions(format_rows=0)


def _top1_from_predictions(path):
    """Top@1 recomputed from a predictions file: the first ranked item is the target."""
    from npu_rft.data.schema import normalize

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return sum(bool(r["parsed"]) and r["parsed"][0] == normalize(r["target"]) for r in rows) / len(rows)


def test_smoke_run_goes_through_every_stage_and_reuses_the_warmup(tmp_path, monkeypatch):
    out, cache = tmp_path / "qs", tmp_path / "cache"
    options = qr.QuickstartOptions.smoke(out_dir=str(out), cache_dir=str(cache))
    result = qr.run_quickstart(options)
    assert set(result.timings_s) == {"data", "tiny_model", "warmup", "eval_before", "grpo", "eval_grpo", "report",
                                     "total"}
    assert list(result.after) == ["grpo"] and result.after["grpo"]["num_cases"] == 8
    assert result.before["top1"] == _top1_from_predictions(out / "predictions-base__warm-up_.jsonl")
    assert result.after["grpo"]["top1"] == _top1_from_predictions(out / "predictions-after_GRPO.jsonl")
    assert set(result.baselines) == {"keep_order", "prior", "chance"}
    assert result.curves == {"grpo": out / "grpo" / "curves.png"} and result.curves["grpo"].is_file()
    assert not (out / "dpo").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["base (warm-up)", "after GRPO", "keep_order", "prior", "chance"]
    assert (out / "report.md").read_text() == result.report and "| GRPO |" in result.report
    summary = json.loads((out / qr.MARKER).read_text())
    assert summary["status"] == "completed" and summary["after"] == result.after
    assert summary["fact_recall"] == result.fact_recall
    assert f"Warm-up fact recall: {result.fact_recall:.2f} of 144 probes" in result.report
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


def test_smoke_run_of_both_arms_from_one_warmup(tmp_path, monkeypatch):
    from npu_rft import trainer
    from npu_rft.plot import read_metrics, refresh_steps

    calls = []
    real_fit = trainer.fit
    monkeypatch.setattr(trainer, "fit", lambda config, resume=None: calls.append(
        (config.algorithm, config.model.name_or_path)) or real_fit(config))
    out = tmp_path / "qs"
    options = qr.QuickstartOptions.smoke(out_dir=str(out), cache_dir=str(tmp_path / "cache"), algorithm="both")
    result = qr.run_quickstart(options)
    # the warm-up (SFT) and its one smoke-size retry (4 steps recall about chance), then both arms
    # from the same warmed-up model
    assert [a for a, _ in calls] == ["sft", "sft", "grpo", "dpo"] and calls[2][1] == calls[3][1]
    assert "the warm-up was redone 1 time(s) with its rows in another order" in result.report
    assert list(result.after) == ["grpo", "dpo"]
    assert result.after["dpo"]["top1"] == _top1_from_predictions(out / "predictions-after_iterative_DPO.jsonl")
    assert {"grpo", "dpo", "eval_grpo", "eval_dpo"} <= set(result.timings_s)
    assert set(result.curves) == {"grpo", "dpo", "both"} and all(p.is_file() for p in result.curves.values())
    assert result.curves["both"] == out / "curves.png"
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["base (warm-up)", "after GRPO", "after iterative DPO", "keep_order", "prior", "chance"]
    assert "| GRPO |" in result.report and "| iterative DPO |" in result.report
    # smoke DPO: 4 updates, 1 batch x 2 epochs an iteration -> refreshes before updates 0 and 2
    records = read_metrics(out / "dpo" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert refresh_steps(records) == [0, 2]
    assert [r["dpo/iteration"] for r in records] == [0.0, 0.0, 1.0, 1.0]


def test_a_warmup_below_the_recall_bar_is_redone_with_its_rows_in_another_order(tmp_path, monkeypatch):
    """Each retry trains the warm-up again from the tiny model, the same recipe with another
    run.seed (the rows' order); at most warmup_retries of them, and the best recall is kept.
    A warm-up at or above the bar is not redone."""
    from npu_rft import trainer

    calls = []
    real_fit = trainer.fit
    monkeypatch.setattr(trainer, "fit", lambda config, resume=None: calls.append(config) or real_fit(config))
    recalls = iter([0.2, 0.6, 0.4])  # the fact recall of each attempt, in turn
    monkeypatch.setattr(qr, "_fact_recall_of", lambda model_dir, device: next(recalls))
    options = qr.QuickstartOptions.smoke(out_dir=str(tmp_path / "qs"), cache_dir=str(tmp_path / "cache"),
                                         warmup_min_recall=0.75, warmup_retries=2, grpo_steps=1)
    qr.run_quickstart(options)
    assert [c.algorithm for c in calls] == ["sft", "sft", "sft", "grpo"]
    first, second, third = calls[:3]
    assert [c.run.seed for c in calls[:3]] == [0, 1000, 2000]
    assert first.model.name_or_path == second.model.name_or_path == third.model.name_or_path  # the tiny model
    assert [Path(c.run.output_dir).name for c in calls[:3]] == ["warmup", "warmup-retry-1", "warmup-retry-2"]
    for retry in (second, third):
        assert retry.optim == first.optim and retry.schedule == first.schedule and retry.data == first.data
    summary = json.loads((tmp_path / "qs" / "quickstart.json").read_text())
    assert summary["warmup_attempts"] == {"recall_of_each": [0.2, 0.6, 0.4], "kept": 1}
    # the kept warm-up is the second: the arm starts from the model the second attempt trained
    kept = Path(second.run.output_dir) / "checkpoints" / "step_00000004" / "model" / "model.safetensors"
    cached = next((tmp_path / "cache" / "quickstart-warmup").iterdir())
    assert (cached / "model.safetensors").read_bytes() == kept.read_bytes()

    calls.clear()  # good enough at once: no retry (and a warm-up of its own: the options are in the cache key)
    recalls = iter([0.8])
    qr.run_quickstart(dataclasses.replace(options, warmup_retries=1))
    assert [c.algorithm for c in calls] == ["sft", "grpo"]
    assert json.loads((tmp_path / "qs" / "quickstart.json").read_text())["warmup_attempts"] == {
        "recall_of_each": [0.8], "kept": 0}
    with pytest.raises(ValueError, match="warmup_min_recall=1.5"):
        qr.QuickstartOptions(warmup_min_recall=1.5)
    with pytest.raises(ValueError, match="warmup_retries=-1"):
        qr.QuickstartOptions(warmup_retries=-1)


def test_dpo_arm_config_is_the_grpo_arm_with_dpo_in_place_of_grpo(tmp_path):
    options = qr.QuickstartOptions(algorithm="dpo", dpo_lr=1e-3, dpo_beta=0.2, dpo_epochs=1,
                                   dpo_batches_per_iteration=3, dpo_steps=30)
    paths = {"train": tmp_path / "t.jsonl", "eval": tmp_path / "e.jsonl"}
    grpo = qr.grpo_config(options, tmp_path / "m", paths, tmp_path / "grpo")
    dpo = qr.dpo_config(options, tmp_path / "m", paths, tmp_path / "dpo")
    for key in ("model", "data", "rollout"):
        assert dpo[key] == grpo[key]
    # the reward: inverse_rank, and in GRPO a clean_end bonus (grpo_clean_end_weight; 0 leaves it out)
    assert dpo["graders"] == [{"name": "inverse_rank"}]
    assert grpo["graders"] == [{"name": "inverse_rank", "weight": 1.0}, {"name": "clean_end", "weight": 0.25}]
    plain = qr.grpo_config(dataclasses.replace(options, grpo_clean_end_weight=0.0), tmp_path / "m", paths, tmp_path / "g")
    assert plain["graders"] == dpo["graders"]
    with pytest.raises(ValueError, match="grpo_clean_end_weight=-1"):
        qr.QuickstartOptions(grpo_clean_end_weight=-1)
    assert dpo["algorithm"] == "dpo" and dpo["optim"] == {"lr": 1e-3} and dpo["schedule"] == {"steps": 30}
    assert dpo["dpo"] == {"beta": 0.2, "loss_type": "sigmoid", "pairing": "best_vs_worst", "reference": "iteration_start", "epochs": 1,
                          "batches_per_iteration": 3, "nll_weight": 1.0, "tie_break": "length"}
    assert dpo["batch"] == {"prompts_per_step": 16, "micro_batch_size": 32}
    assert options.arms == ("dpo",) and qr.QuickstartOptions(algorithm="both").arms == ("grpo", "dpo")


def test_a_foreign_output_directory_is_left_alone(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a quickstart output"):
        qr.run_quickstart(qr.QuickstartOptions.smoke(out_dir=str(tmp_path), cache_dir=str(tmp_path / "c")))
    assert (tmp_path / "mine.txt").read_text() == "keep"


def _meets_the_target(result, arm):
    """The quickstart's target for one arm: a base at about chance, then at least
    +0.30 Top@1 on the eval split with no format failures."""
    chance = result.baselines["chance"]["top1"]
    after = result.after[arm]
    assert abs(result.before["top1"] - chance) < 0.15, (result.before, chance)  # the base ranks at about chance
    assert result.before["format_failure_rate"] == 0.0
    assert after["top1"] - result.before["top1"] >= 0.30, (arm, result.before["top1"], after["top1"])
    assert after["format_failure_rate"] == 0.0


# Slow: each run is a full quickstart with a cold cache (about 4 minutes on an idle 2-core
# machine, twice that under load); not run in CI. The figures depend on the CPU: the GRPO
# seeds were run on the AMD EPYC VM of 2026-12-06 with the warm-up retry and clean_end (all meet
# the target); there DPO seed 1 misses it by one unparseable answer, which it met on the Intel
# Xeon VM of 2026-12-05 (docs/quickstart.md, "On another CPU").
@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])  # the 0-2, and 3, which failed before the warm-up fix
def test_full_quickstart_grpo_meets_its_target(tmp_path, seed):
    result = qr.run_quickstart(qr.QuickstartOptions(out_dir=str(tmp_path / "qs"), cache_dir=str(tmp_path / "cache"),
                                                    seed=seed))
    _meets_the_target(result, "grpo")


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("seed", [0, 1])  # the two seeds that failed before the NLL term (dpo_nll_weight)
def test_full_quickstart_dpo_meets_its_target(tmp_path, seed):
    result = qr.run_quickstart(qr.QuickstartOptions(out_dir=str(tmp_path / "qs"), cache_dir=str(tmp_path / "cache"),
                                                    seed=seed, algorithm="dpo"))
    _meets_the_target(result, "dpo")
