"""A seeded generator of DxBench-format diagnosis cases, the fact corpus that
links their symptoms to diseases, and the JSON-format warm-up rows.

The world is a fixed table (``DEPARTMENTS``): 24 diseases in 4 departments,
each with 3 characteristic symptoms that belong to it alone, plus ``NOISE``
symptoms that say nothing about the disease. Every name is one lower-case word,
so the tiny tokenizer can hold each as a single token, and no name is a
substring of another.

A case of disease ``d`` (``generate_cases``):

- positives: 2 or 3 of d's characteristic symptoms and 0 to 2 noise symptoms,
  all ``"True"``; the first 1 or 2 (in a random order) are explicit, the rest
  implicit;
- negatives (implicit, ``"False"``): with probability 1/2 a characteristic
  symptom of one of the distractor candidates, with probability 1/3 a noise
  symptom;
- candidates: d and 2 to 4 distractors drawn uniformly from the other 23
  diseases (3, 4 or 5 candidates, equally likely), shuffled, so the answer is
  equally likely at every position.

The rows are the DxBench JSON format: ``id, department, explicit_symptoms,
implicit_symptoms, candidate_diseases, disease``, symptoms as
``[name, "True"|"False"]`` pairs.

The fact corpus (``fact_corpus``) states the table as sentences, so that a
language model trained on it "knows the medicine" before it ever sees a ranking
prompt. The format warm-up (``format_warmup_rows``) teaches the answer format
only: each prompt shows one case's symptoms with another case's candidates,
and the target lists those candidates in a random order, so it carries no
ranking signal.
"""
from __future__ import annotations

import itertools
import json
import random
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

DEPARTMENTS: Dict[str, Dict[str, Tuple[str, str, str]]] = {
    "Respiratory": {
        "influenza": ("fever", "chills", "myalgia"),
        "asthma": ("wheezing", "dyspnea", "tightness"),
        "pneumonia": ("cough", "sputum", "crackles"),
        "laryngitis": ("hoarseness", "aphonia", "stridor"),
        "rhinitis": ("sneezing", "rhinorrhea", "congestion"),
        "tuberculosis": ("hemoptysis", "nightsweats", "cachexia"),
    },
    "Gastroenterology": {
        "gastritis": ("dyspepsia", "bloating", "nausea"),
        "hepatitis": ("jaundice", "anorexia", "hepatomegaly"),
        "appendicitis": ("guarding", "rebound", "leukocytosis"),
        "cholecystitis": ("colic", "belching", "steatorrhea"),
        "pancreatitis": ("epigastralgia", "vomiting", "amylasemia"),
        "colitis": ("diarrhea", "tenesmus", "hematochezia"),
    },
    "Neurology": {
        "migraine": ("aura", "photophobia", "throbbing"),
        "epilepsy": ("seizures", "convulsions", "incontinence"),
        "parkinsonism": ("tremor", "rigidity", "bradykinesia"),
        "meningitis": ("stiffneck", "headache", "petechiae"),
        "neuropathy": ("numbness", "tingling", "burning"),
        "labyrinthitis": ("dizziness", "nystagmus", "tinnitus"),
    },
    "General": {
        "eczema": ("itching", "dryness", "lichenification"),
        "psoriasis": ("plaques", "scaling", "pitting"),
        "urticaria": ("hives", "wheals", "angioedema"),
        "urethritis": ("dysuria", "frequency", "urgency"),
        "anemia": ("pallor", "fatigue", "palpitations"),
        "gout": ("podagra", "tophi", "swelling"),
    },
}

NOISE: Tuple[str, ...] = (
    "insomnia", "thirst", "malaise", "anxiety", "backache",
    "earache", "cramps", "constipation", "sweating", "irritability",
)

SYMPTOMS: Dict[str, Tuple[str, str, str]] = {
    d: s for table in DEPARTMENTS.values() for d, s in table.items()
}
DEPARTMENT_OF: Dict[str, str] = {d: dep for dep, table in DEPARTMENTS.items() for d in table}
DISEASES: Tuple[str, ...] = tuple(SYMPTOMS)


def vocabulary() -> List[str]:
    """Every disease and symptom name (each becomes one token of the tiny tokenizer)."""
    names = list(DISEASES) + [s for syms in SYMPTOMS.values() for s in syms] + list(NOISE)
    return names


def _make_case(rng: random.Random, case_id: str) -> Dict[str, object]:
    disease = rng.choice(DISEASES)
    n_candidates = rng.choice((3, 4, 5))
    distractors = rng.sample([d for d in DISEASES if d != disease], n_candidates - 1)
    candidates = [disease] + distractors
    rng.shuffle(candidates)

    positives = rng.sample(SYMPTOMS[disease], rng.choice((2, 3)))
    positives += rng.sample(NOISE, rng.randint(0, 2))
    rng.shuffle(positives)
    negatives = []
    if rng.random() < 1 / 2:
        negatives.append(rng.choice(SYMPTOMS[rng.choice(distractors)]))
    if rng.random() < 1 / 3:
        negatives.append(rng.choice([s for s in NOISE if s not in positives]))

    n_explicit = rng.choice((1, 2))
    explicit = [[s, "True"] for s in positives[:n_explicit]]
    implicit = [[s, "True"] for s in positives[n_explicit:]] + [[s, "False"] for s in negatives]
    rng.shuffle(implicit)
    return {
        "id": case_id,
        "department": DEPARTMENT_OF[disease],
        "explicit_symptoms": explicit,
        "implicit_symptoms": implicit,
        "candidate_diseases": candidates,
        "disease": disease,
    }


def generate_cases(n: int, seed: int = 0, id_prefix: str = "sample") -> List[Dict[str, object]]:
    """``n`` DxBench-format cases with ids ``{id_prefix}_{i}``; the same seed gives the same cases."""
    if n < 1:
        raise ValueError(f"generate_cases: n={n}; ask for at least one case")
    rng = random.Random(seed)
    return [_make_case(rng, f"{id_prefix}_{i}") for i in range(n)]


_FACT_TEMPLATES_3 = (
    "{d} causes {a}, {b} and {c}.",
    "{a}, {b} and {c} are signs of {d}.",
)
_FACT_TEMPLATES_2 = (
    "a patient with {a} and {b} may have {d}.",
    "{a} with {b} suggests {d}.",
)
_FACT_TEMPLATES_1 = (
    "{a} is a symptom of {d}.",
    "{d} presents with {a}.",
)


def fact_corpus(seed: int = 0) -> List[str]:
    """Sentences stating which symptoms belong to which disease, in a seeded order.

    For each disease: both three-symptom templates for every order of its three
    symptoms, both two-symptom templates for every ordered pair, both
    one-symptom templates for each symptom, and a sentence naming its
    department: 12 + 12 + 6 + 1 = 31 sentences, 744 in all.
    """
    lines = []
    for disease, symptoms in SYMPTOMS.items():
        for a, b, c in itertools.permutations(symptoms, 3):
            lines += [t.format(d=disease, a=a, b=b, c=c) for t in _FACT_TEMPLATES_3]
        for a, b in itertools.permutations(symptoms, 2):
            lines += [t.format(d=disease, a=a, b=b) for t in _FACT_TEMPLATES_2]
        for a in symptoms:
            lines += [t.format(d=disease, a=a) for t in _FACT_TEMPLATES_1]
        lines.append(f"{disease} is treated in {DEPARTMENT_OF[disease].lower()}.")
    random.Random(seed).shuffle(lines)
    return lines


def mismatched_cases(n: int, seed: int = 0, id_prefix: str = "format") -> List[Dict[str, object]]:
    """``n`` DxBench-format cases whose symptoms come from one generated case and
    whose candidates come from a different one, for the format warm-up.

    ``disease`` is set to the first candidate only to keep the row valid
    DxBench (the target is among the candidates); ``format_warmup_rows``
    replaces it with a random ordering of all candidates.
    """
    pool = generate_cases(2 * n, seed=seed, id_prefix=id_prefix)
    out = []
    for i in range(n):
        symptoms_from, candidates_from = pool[2 * i], pool[2 * i + 1]
        out.append({
            "id": f"{id_prefix}_{i}",
            "department": symptoms_from["department"],
            "explicit_symptoms": symptoms_from["explicit_symptoms"],
            "implicit_symptoms": symptoms_from["implicit_symptoms"],
            "candidate_diseases": candidates_from["candidate_diseases"],
            "disease": candidates_from["candidate_diseases"][0],
        })
    return out


def answer_json(ranking: Sequence[str]) -> str:
    """The answer format the prompts ask for: ``{"possible_diseases": [...]}`` on one line."""
    return json.dumps({"possible_diseases": list(ranking)}, ensure_ascii=False)


def format_warmup_rows(rows: Iterable[Mapping[str, object]], seed: int = 0) -> List[Dict[str, object]]:
    """Converted rows of ``mismatched_cases`` -> SFT rows whose target is the
    JSON answer listing ``meta.candidates`` in a uniformly random order.

    ``rows`` are ``{system, context, target, meta}`` dicts as ``convert-data``
    writes them; ``system`` and ``context`` are kept, ``meta`` keeps only the id.
    """
    rng = random.Random(seed)
    out = []
    for row in rows:
        meta = row["meta"]
        candidates = list(meta["candidates"])
        out.append({
            "system": row.get("system"),
            "context": row["context"],
            "target": answer_json(rng.sample(candidates, len(candidates))),
            "meta": {"id": meta["id"]},
        })
    return out
