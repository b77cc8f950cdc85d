import pytest

from npu_rft.quickstart import probe, sample_data


def test_one_probe_per_disease_and_ordered_symptom_pair():
    probes = probe.fact_probes()
    assert len(probes) == 24 * 6
    sentences, answer = probes[0]
    disease = sample_data.DISEASES[answer]
    a, b = sample_data.SYMPTOMS[disease][:2]
    assert sentences[answer] == f"{a} with {b} suggests {disease}."
    assert len(sentences) == len(sample_data.DISEASES) and len(set(sentences)) == len(sentences)
    # the probe sentence is one the fact corpus holds
    assert sentences[answer] in sample_data.fact_corpus(seed=0)


def _knows(diseases_known):
    """A scorer that gives the true sentence the top score for the named diseases only."""
    def score(sentences):
        out = []
        for s in sentences:
            words = s.rstrip(".").split()
            a, b, d = words[0], words[2], words[-1]
            out.append(2.0 if d in diseases_known and {a, b} <= set(sample_data.SYMPTOMS[d]) else 1.0)
        return out
    return score


def test_recall_counts_the_probes_whose_true_sentence_scores_first():
    assert probe.fact_recall(_knows(set(sample_data.DISEASES))) == 1.0
    half = set(sample_data.DISEASES[:12])
    assert probe.fact_recall(_knows(half)) == 0.5
    # a scorer that always prefers one disease recalls exactly that disease's probes
    assert probe.fact_recall(lambda s: [float(x.endswith("influenza.")) for x in s]) == pytest.approx(1 / 24)
    # all-equal scores are not a recall
    assert probe.fact_recall(lambda s: [0.0] * len(s)) == 0.0


def test_sentence_log_probs_is_the_models_sum_over_tokens_after_the_first(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    sentences = ["fever with chills suggests influenza.", "a b"]
    got = probe.sentence_log_probs(model, tokenizer)(sentences)
    for sentence, value in zip(sentences, got):  # one at a time, no padding
        ids = tokenizer(sentence, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        assert value == pytest.approx(float(logp.gather(1, ids[0, 1:, None]).sum()), abs=1e-4)
