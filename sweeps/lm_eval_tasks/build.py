"""Build the data of the local lm-eval tasks from packaged text: `python -m sweeps.lm_eval_tasks.build`.

The tasks need no network: their documents are JSONL files next to their YAML files, made here,
deterministically (seeded), from the Lee corpus (`packaged:lee`, 300 news articles, which the
sweeps keep for held-out evaluation: calibration and finetuning read `packaged:wiki`):

- `lee_cloze.jsonl` (multiple choice, like HellaSwag): two consecutive sentences of an article and
  four candidate next sentences, the article's own and three from other articles (sentences of 4
  to 60 words); chance is 25 %.
- `lee_lastword.jsonl` (log-likelihood, like LAMBADA): the first sentences of an article with its
  last word cut off; the target is that word.
- `lee_documents.jsonl` (rolling log-likelihood, like wikitext): every article whole.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).parent
SEED = 0
FILES = ("lee_cloze.jsonl", "lee_lastword.jsonl", "lee_documents.jsonl")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
_LAST_WORD = re.compile(r"^(?P<context>.+\S)\s+(?P<word>[A-Za-z]{3,})\.$")


def sentences(article: str) -> list[str]:
    """The sentences of an article, in order, whitespace normalised."""
    return [" ".join(s.split()) for s in _SENTENCE_END.split(article) if s.strip()]


def _fits(sentence: str) -> bool:
    return 4 <= len(sentence.split()) <= 60


def cloze(articles: list[str], rng: random.Random) -> list[dict]:
    split = [sentences(a) for a in articles]
    pool = [[s for s in sents if _fits(s)] for sents in split]
    items = []
    for i, own in enumerate(split):
        starts = [k for k in range(len(own) - 2) if all(_fits(s) for s in own[k:k + 3])]
        if not starts:
            continue
        start = rng.choice(starts)
        others = [s for j, sents in enumerate(pool) if j != i for s in sents]
        choices = [own[start + 2], *rng.sample(others, 3)]
        rng.shuffle(choices)
        items.append({"context": f"{own[start]} {own[start + 1]}", "choices": choices,
                      "label": choices.index(own[start + 2])})
    return items


def lastword(articles: list[str]) -> list[dict]:
    """A passage of at least 40 words: the article's first sentences up to the first that ends
    in a word of three letters or more, then a full stop; that word is the target."""
    items = []
    for article in articles:
        passage = []
        for sentence in sentences(article):
            passage.append(sentence)
            match = _LAST_WORD.match(" ".join(passage))
            if match and len(match["context"].split()) >= 40:
                items.append({"context": match["context"], "target": match["word"]})
                break
    return items


def build(articles: list[str]) -> dict[str, list[dict]]:
    rng = random.Random(SEED)
    return {"lee_cloze.jsonl": cloze(articles, rng), "lee_lastword.jsonl": lastword(articles),
            "lee_documents.jsonl": [{"text": a} for a in articles]}


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def main() -> None:
    from trainables.sources import load_documents

    for file, rows in build(list(load_documents("packaged:lee"))).items():
        (HERE / file).write_text(jsonl(rows), encoding="utf-8")
        print(f"{file}: {len(rows)} documents")


if __name__ == "__main__":
    main()
