"""Tests for npu_rft/evaluate.py: baselines recomputed by hand on a small table
(3, 4 and 5 candidates), the bootstrap interval, k parsing, the report, and
``evaluate`` itself on scripted completions and on a tiny model."""
from __future__ import annotations

import json

import pytest

from npu_rft.data.schema import DataError, Example
from npu_rft import evaluate as ev


def ex(cands, target, dep=None, i=0):
    meta = {"id": f"e{i}", "candidates": cands}
    if dep:
        meta["department"] = dep
    return Example(context=f"case {i}", target=target, meta=meta, location=f"eval.jsonl:{i + 1}")


# Train targets: A x3, B x2, C x1 (D, E, F never).
TRAIN = [ex(["A", "B"], t, i=i) for i, t in enumerate("AAABBC")]
TABLE = [
    ex(["A", "B", "C"], "A", "x", 0),            # n=3
    ex(["B", "C", "D", "E"], "D", "x", 1),       # n=4
    ex(["C", "D", "E", "F", "A"], "C", "y", 2),  # n=5
    ex(["E", "F", "B", "A"], "A", "y", 3),       # n=4
    ex(["B", "b ", "C"], "C", None, 4),          # "b " duplicates "B" after normalising: n=2
]
# Per case, by hand (target position p; score 1 - p/(n-1)):
#   keep_order: p = 0, 2, 0, 3, 1
#   prior: counts order the candidates; ties uniform:
#     1: A3 B2 C1, target A -> p=0
#     2: B2 C1 D0 E0, target D -> p uniform on {2, 3}
#     3: A3 C1 D0 E0 F0, target C -> p=1
#     4: A3 B2 E0 F0, target A -> p=0
#     5: B2 C1, target C -> p=1
#   chance: p uniform on 0..n-1
EXPECTED = {
    "keep_order": {"top1": (1 + 0 + 1 + 0 + 0) / 5, "top3": (1 + 1 + 1 + 0 + 1) / 5,
                   "mean_score": (1 + 1 / 3 + 1 + 0 + 0) / 5},
    "prior": {"top1": (1 + 0 + 0 + 1 + 0) / 5, "top3": (1 + 0.5 + 1 + 1 + 1) / 5,
              "mean_score": (1 + (1 / 3 + 0) / 2 + 0.75 + 1 + 0) / 5},
    "chance": {"top1": (1 / 3 + 1 / 4 + 1 / 5 + 1 / 4 + 1 / 2) / 5, "top3": (1 + 3 / 4 + 3 / 5 + 3 / 4 + 1) / 5,
               "mean_score": 0.5},
}


def test_baselines_match_the_hand_computed_table():
    out = ev.baselines(TABLE, train_examples=TRAIN, k="1,3")
    assert list(out) == ["keep_order", "prior", "chance"]
    for name, expected in EXPECTED.items():
        for key, value in expected.items():
            assert out[name].metrics[key] == pytest.approx(value), (name, key)
        assert out[name].metrics["num_cases"] == 5
        assert out[name].predictions == []
    # Departments: x = cases 1-2, y = cases 3-4; the last case has none and is
    # counted under "(none)", listed last.
    assert out["keep_order"].by_department == {
        "x": {"num_cases": 2, "top1": 0.5, "mean_score": pytest.approx((1 + 1 / 3) / 2)},
        "y": {"num_cases": 2, "top1": 0.5, "mean_score": 0.5},
        "(none)": {"num_cases": 1, "top1": 0.0, "mean_score": 0.0},
    }
    assert list(out["keep_order"].by_department) == ["x", "y", "(none)"]
    assert out["chance"].by_department["y"]["top1"] == pytest.approx((1 / 5 + 1 / 4) / 2)
    assert out["chance"].by_department["(none)"]["top1"] == pytest.approx(1 / 2)


def test_department_breakdown_only_when_some_row_has_one():
    rows = [ex(["A", "B"], "A", i=0), ex(["A", "B", "C"], "C", i=1)]
    assert ev.baselines(rows)["keep_order"].by_department == {}
    assert ev.department_table(ev.baselines(rows)) == ""
    named = ex(["A", "B"], "B", "(none)", i=2)
    with pytest.raises(DataError, match=r"eval.jsonl:3: meta.department is '\(none\)'.*rename the department"):
        ev.baselines(rows + [named])


def test_prior_is_an_expectation_over_ties_and_ignores_the_listed_order():
    train = [ex(["A", "B"], "A", i=i) for i in range(2)]
    for cands in (["B", "C", "A", "D"], ["D", "C", "B", "A"]):
        # Target C ties with B and D at count 0, below A: p uniform on {1, 2, 3}.
        m = ev.baselines([ex(cands, "C")], train_examples=train, k=(1, 2))["prior"].metrics
        assert m["top1"] == 0 and m["top2"] == pytest.approx(1 / 3)
        assert m["mean_score"] == pytest.approx(((1 - 1 / 3) + (1 - 2 / 3) + 0) / 3)
    # All candidates unseen: exactly chance.
    m = ev.baselines([ex(["X", "Y", "Z"], "Y")], train_examples=train)["prior"].metrics
    assert m["top1"] == pytest.approx(1 / 3)


def test_without_train_rows_there_is_no_prior_and_score_only_for_inverse_rank():
    out = ev.baselines(TABLE, grader="exact_match")
    assert list(out) == ["keep_order", "chance"]
    assert "mean_score" not in out["chance"].metrics


def test_baselines_need_candidates_and_a_listed_target():
    with pytest.raises(DataError, match="eval.jsonl:1.*meta.candidates"):
        ev.baselines([Example(context="c", target="A", location="eval.jsonl:1")])
    with pytest.raises(DataError, match="not among meta.candidates"):
        ev.baselines([Example(context="c", target="Q", meta={"candidates": ["A"]}, location="eval.jsonl:1")])


def test_parse_k():
    assert ev.parse_k("3,1") == (1, 3)
    assert ev.parse_k([5]) == (1, 5)
    with pytest.raises(ValueError, match=">= 1"):
        ev.parse_k("0,1")
    with pytest.raises(ValueError, match="comma-separated"):
        ev.parse_k("one")


def test_bootstrap_interval():
    assert ev.bootstrap_ci([1.0] * 10) == (1.0, 1.0)
    values = [i / 100 for i in range(100)]
    low, high = ev.bootstrap_ci(values, seed=0)
    # Mean 0.495, standard error 0.29 / 10: the interval is about 0.495 -+ 0.057.
    assert 0.425 < low < 0.45 and 0.54 < high < 0.565
    assert (low, high) == ev.bootstrap_ci(values, seed=0)
    assert (low, high) != ev.bootstrap_ci(values, seed=1)


def test_report_table_and_files(tmp_path):
    systems = dict(ev.baselines(TABLE, train_examples=TRAIN, k="1,3"))
    systems["model"] = ev.EvalResult(
        metrics={"top1": 0.5, "top3": 1.0, "top1_ci_low": 0.25, "top1_ci_high": 0.75, "mean_score": 0.7,
                 "format_failure_rate": 0.1, "mean_completion_tokens": 12.0, "num_cases": 5, "samples": 1},
        by_department={"x": {"num_cases": 2, "top1": 1.0, "mean_score": 1.0}},
        predictions=[{"id": "e0", "sample": 0, "completion": "{}", "parsed": None, "score": 0.0,
                      "reason": "no list", "target": "A"}],
    )
    text = ev.render_report(systems)
    lines = text.splitlines()
    assert lines[0] == "| system | Top@1 (95% CI) | Top@3 | mean score | format failures | mean tokens | cases |"
    assert lines[2].startswith("| keep_order | 0.400 [") and lines[2].endswith("| 0.800 | 0.467 | – | – | 5 |")
    assert lines[5] == "| model | 0.500 [0.250, 0.750] | 1.000 | 0.700 | 10.0% | 12.0 | 5 |"
    assert "| x | 2 | 0.500 | 0.500 | 0.292 | 1.000 |" in lines  # chance: (1/3 + 1/4) / 2
    assert lines[-1] == "| (none) | 1 | 0.000 | 0.000 | 0.500 | – |"  # the model's result has no such bucket
    paths = ev.write_report(tmp_path / "out", systems)
    assert paths["report"].read_text() == text
    data = json.loads(paths["metrics"].read_text())
    assert data["prior"]["metrics"]["top3"] == pytest.approx(0.9)
    rows = [json.loads(line) for line in paths["predictions:model"].read_text().splitlines()]
    assert rows == systems["model"].predictions
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics.json", "predictions-model.jsonl", "report.md"]


# ---------------------------------------------------------------- evaluate()

NAMES = ["gout", "asthma", "anemia", "eczema", "migraine"]
CASES = [  # (candidates, target, department, scripted completions of samples 0 and 1)
    (NAMES[:3], "gout", "x", ['{"possible_diseases": ["gout", "asthma", "anemia"]}', "I do not know"]),
    (NAMES[:4], "eczema", "y", ['{"possible_diseases": ["gout", "eczema"]}',
                                '{"possible_diseases": ["eczema", "eczema", "junk"]}']),
    (NAMES, "migraine", "y", ['{"possible_diseases": ["gout", "asthma", "anemia", "eczema", "migraine"]}'] * 2),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from npu_rft.quickstart import tiny_model as tm

    spec = tm.TinyModelSpec(bpe_vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    path = tm.build_tiny_model(["case one two three"], NAMES, spec=spec, cache_dir=tmp_path_factory.mktemp("c"))
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def scripted_examples():
    return [Example(context=f"case {i}", target=t, system="sys",
                    meta={"id": f"e{i}", "candidates": c, "department": d}, location=f"eval.jsonl:{i + 1}")
            for i, (c, t, d, _) in enumerate(CASES)]


class ScriptedSampler:
    """Returns the scripted completions of each prompt (found by its token ids), EOS appended."""

    def __init__(self, tokenizer, examples):
        from npu_rft.data.prompts import encode_prompt

        self.tok = tokenizer
        self.script = {tuple(encode_prompt(tokenizer, e)): case[3] for e, case in zip(examples, CASES)}
        self.params = []

    def sample(self, prompt_ids, params, generator=None):
        from npu_rft.rollout import Samples

        self.params.append(params)
        out = Samples([], [], [])
        for p, ids in enumerate(prompt_ids):
            for text in self.script[tuple(ids)][: params.num_samples]:
                out.prompt_index.append(p)
                out.completion_ids.append(self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id])
                out.truncated.append(False)
        return out


def test_evaluate_scores_scripted_completions_by_hand(tiny, monkeypatch):
    import torch

    from npu_rft import rollout
    from npu_rft.device import get_device

    model, tok = tiny
    examples = scripted_examples()
    sampler = ScriptedSampler(tok, examples)
    monkeypatch.setattr(rollout, "make_sampler", lambda *a, **k: sampler)
    module = torch.nn.Linear(1, 1).train()
    model.generation_config.eos_token_id = tok.eos_token_id
    monkeypatch.setattr(module, "generation_config", model.generation_config, raising=False)

    result = ev.evaluate(module, tok, examples, device=get_device("cpu"), k="1,3", samples=2,
                         temperature=0.7, batch_size=2, progress=False)
    assert module.training  # mode restored
    assert [p.temperature for p in sampler.params] == [0.7, 0.7] and sampler.params[0].num_samples == 2
    m = result.metrics
    # Per case (mean over the 2 samples):
    #   top1 0.5, 0.5, 0;  top3 0.5, 1, 0;  score 0.5, (2/3 + 1)/2, 0;  failures 0.5, 0, 0;  best-of-2 1, 1, 0
    assert m["top1"] == pytest.approx(1 / 3)
    assert m["top3"] == pytest.approx(0.5)
    assert m["mean_score"] == pytest.approx((0.5 + 5 / 6 + 0) / 3)
    assert m["format_failure_rate"] == pytest.approx(1 / 6)
    assert m["best_of_n_top1"] == pytest.approx(2 / 3)
    assert m["num_cases"] == 3 and m["samples"] == 2
    lengths = [len(tok(text, add_special_tokens=False)["input_ids"]) for case in CASES for text in case[3]]
    assert m["mean_completion_tokens"] == pytest.approx(sum(lengths) / 6)  # EOS not counted
    assert m["top1_ci_low"] <= m["top1"] <= m["top1_ci_high"]
    assert result.by_department == {
        "x": {"num_cases": 1, "top1": 0.5, "mean_score": 0.5},
        "y": {"num_cases": 2, "top1": 0.25, "mean_score": pytest.approx(5 / 12)},
    }
    assert len(result.predictions) == 6
    by_key = {(p["id"], p["sample"]): p for p in result.predictions}
    assert by_key[("e1", 1)] == {"id": "e1", "sample": 1, "completion": CASES[1][3][1], "parsed": ["eczema"],
                                 "score": 1.0, "reason": None, "target": "eczema"}
    assert by_key[("e0", 1)]["parsed"] is None and by_key[("e0", 1)]["reason"].startswith("no JSON")

    greedy = ev.evaluate(module, tok, examples, device=get_device("cpu"), progress=False)
    assert sampler.params[-1].temperature == 0 and sampler.params[-1].num_samples == 1
    assert greedy.metrics["top1"] == pytest.approx(1 / 3)  # samples 0: hit, miss, miss
    assert "best_of_n_top1" not in greedy.metrics and "top3" not in greedy.metrics

    # A row without a department is counted under "(none)". Greedy, per case:
    # e0 hit, score 1; e1 target 2nd of 4, score 2/3; e2 target 5th of 5, score 0.
    del examples[0].meta["department"]
    mixed = ev.evaluate(module, tok, examples, device=get_device("cpu"), progress=False)
    assert mixed.by_department == {
        "y": {"num_cases": 2, "top1": 0.0, "mean_score": pytest.approx(1 / 3)},
        "(none)": {"num_cases": 1, "top1": 1.0, "mean_score": 1.0},
    }


def test_evaluate_checks_its_inputs(tiny):
    from npu_rft.device import get_device

    model, tok = tiny
    bad = [Example(context="c", target="gout", location="eval.jsonl:7")]
    with pytest.raises(DataError, match="eval.jsonl:7"):
        ev.evaluate(model, tok, bad, device=get_device("cpu"), progress=False)
    with pytest.raises(ValueError, match="samples=0"):
        ev.evaluate(model, tok, scripted_examples(), device=get_device("cpu"), samples=0)
    with pytest.raises(ValueError, match="no examples"):
        ev.evaluate(model, tok, [], device=get_device("cpu"))


def test_evaluate_drives_a_real_model_reproducibly(tiny, monkeypatch):
    from npu_rft import rollout
    from npu_rft.data.prompts import encode_prompt
    from npu_rft.device import get_device

    model, tok = tiny
    # Every 8th token id ends a completion, so with seed 5 some completions stop
    # at an EOS and others run to max_new_tokens.
    eos = set(range(0, len(tok), 8)) | {tok.eos_token_id}
    monkeypatch.setattr(model.generation_config, "eos_token_id", sorted(eos))
    sampled = {}  # prompt ids -> the completion ids the real sampler returned

    def recording_sampler(*args, **kwargs):
        sampler = real_make_sampler(*args, **kwargs)
        real_sample = sampler.sample

        def sample(prompt_ids, params, generator=None):
            out = real_sample(prompt_ids, params, generator=generator)
            for p, ids in zip(out.prompt_index, out.completion_ids):
                sampled.setdefault(tuple(prompt_ids[p]), []).append(list(ids))
            return out

        sampler.sample = sample
        return sampler

    real_make_sampler = rollout.make_sampler
    monkeypatch.setattr(rollout, "make_sampler", recording_sampler)
    kwargs = dict(device=get_device("cpu"), samples=3, max_new_tokens=6, batch_size=2, seed=5, progress=False)
    first = ev.evaluate(model, tok, scripted_examples(), **kwargs)
    outputs = [sampled.pop(tuple(encode_prompt(tok, e))) for e in scripted_examples()]
    again = ev.evaluate(model, tok, scripted_examples(), **kwargs)
    assert len(first.predictions) == 9
    assert [p["completion"] for p in first.predictions] == [p["completion"] for p in again.predictions]
    # Tokens per completion by hand from the sampled ids: a final EOS is not
    # counted; the mean is over each case's 3 samples, then over the 3 cases.
    assert [len(o) for o in outputs] == [3, 3, 3]
    ended = [ids[-1] in eos for o in outputs for ids in o]
    assert any(ended) and not all(ended)  # both kinds of ending are counted
    per_case = [sum(len(ids) - (ids[-1] in eos) for ids in o) / 3 for o in outputs]
    assert first.metrics["mean_completion_tokens"] == pytest.approx(sum(per_case) / 3)
