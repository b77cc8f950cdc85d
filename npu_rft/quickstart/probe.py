"""Did the warm-up teach the facts? ``fact_recall`` measures it.

The quickstart's RL arms can only teach a model to rank candidates it can
already tell apart: the warm-up must have learned which symptoms belong to
which disease from the fact corpus. Whether it did depends on the seed
(docs/quickstart.md), so the quickstart measures it and reports it beside
the base's Top@1.

One probe per disease and ordered pair of its symptoms (24 x 6 = 144): the
fact-corpus sentence "{a} with {b} suggests {d}." is scored for every one of
the 24 diseases ``d``, and the probe is recalled when the true disease scores
highest. Chance is 1/24.
"""
from __future__ import annotations

import itertools
from typing import Callable, List, Sequence, Tuple

from npu_rft.quickstart import sample_data

PROBE_TEMPLATE = "{a} with {b} suggests {d}."  # one of sample_data's fact templates
# Below this the quickstart warns that RL is unlikely to teach ranking (measured: a base at
# 0.04 never learned, bases at 0.69 and above did; docs/quickstart.md).
WEAK_RECALL = 0.5


def fact_probes() -> List[Tuple[List[str], int]]:
    """Per probe: the sentence for each disease (in ``sample_data.DISEASES`` order)
    and the index of the true one."""
    probes = []
    for disease, symptoms in sample_data.SYMPTOMS.items():
        for a, b in itertools.permutations(symptoms, 2):
            sentences = [PROBE_TEMPLATE.format(a=a, b=b, d=d) for d in sample_data.DISEASES]
            probes.append((sentences, sample_data.DISEASES.index(disease)))
    return probes


def fact_recall(score: Callable[[Sequence[str]], Sequence[float]]) -> float:
    """The share of ``fact_probes()`` whose true sentence ``score`` ranks first
    (ties count as misses). ``score`` maps sentences to numbers, higher is likelier."""
    probes = fact_probes()
    hits = 0
    for sentences, answer in probes:
        scores = list(score(sentences))
        best = max(scores)
        hits += scores[answer] == best and scores.count(best) == 1
    return hits / len(probes)


def sentence_log_probs(model, tokenizer) -> Callable[[Sequence[str]], List[float]]:
    """A ``score`` for ``fact_recall``: each sentence's summed token log-probability
    under ``model`` (every token after the first, which all of a probe's sentences share)."""
    import torch

    device = next(model.parameters()).device

    @torch.no_grad()
    def score(sentences: Sequence[str]) -> List[float]:
        enc = tokenizer(list(sentences), return_tensors="pt", padding=True, padding_side="right")
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
        token_logp = logp.gather(2, ids[:, 1:, None])[..., 0] * mask[:, 1:]
        return token_logp.sum(1).tolist()  # host: one read per probe, after the forward

    return score
