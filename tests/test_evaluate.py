"""`lrsweep evaluate` and what it is made of, offline: the local lm-eval tasks (built from packaged
text, scored as a direct computation on the model's logits scores them), full-context perplexity
(the windowed perplexity of every window), compact and dense exports giving the same numbers, the
classification path, and clear errors."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from compression.apply import compress, decompose_model, plan_ranks
from compression.calibration import collect_stats
from compression.errors import UserInputError
from compression.io import save_compressed, save_dense
from sweeps.cli import main
from sweeps.evaluation import LOCAL_TASKS, evaluate
from sweeps.lm_eval_tasks import build
from trainables.evaluation import classification_metrics, perplexity
from trainables.harness import context_length, context_perplexity, lm_eval_tasks
from trainables.sources import draw_windows, load_documents, load_labelled, load_model

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    loaded = load_model("tiny:llama", seed=0)
    return loaded.model, loaded.tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n\n".join(" ".join(load_documents("packaged:lee")[i].split()[:120]) for i in range(12)))
    return path


@pytest.fixture(scope="module")
def exports(tiny, corpus, tmp_path_factory):
    """A whiten-compressed tiny llama as a compact and a dense export, with its tokenizer."""
    model, tokenizer = tiny
    windows = draw_windows(f"path:{corpus}", tokenizer, 64, {"calibration": 8})["calibration"]
    stats = collect_stats(model, [{"input_ids": windows[:4]}, {"input_ids": windows[4:]}], progress=False)
    decs = decompose_model(model, stats, "whiten")
    plan = plan_ranks(model, stats, "whiten", 0.3, "uniform", decs)
    small = compress(model, stats, "whiten", plan, decs, inplace=False)
    root = tmp_path_factory.mktemp("exports")
    return (save_compressed(small, root / "compact", tokenizer=tokenizer, plan=plan),
            save_dense(small, root / "dense", tokenizer=tokenizer, plan=plan))


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_shipped_task_data_is_what_the_builder_makes_of_packaged_text():
    built = build.build(list(load_documents("packaged:lee")))
    for file, rows in built.items():
        assert (LOCAL_TASKS / file).read_text(encoding="utf-8") == build.jsonl(rows), file
    articles = [" ".join(a.split()) for a in load_documents("packaged:lee")]
    cloze = built["lee_cloze.jsonl"]
    assert len(cloze) > 250 and all(len(d["choices"]) == 4 and 0 <= d["label"] < 4 for d in cloze)
    assert all(any(f"{d['context']} {d['choices'][d['label']]}" in a for a in articles) for d in cloze)
    lastword = built["lee_lastword.jsonl"]
    assert len(lastword) == 300 and all(d["target"].isalpha() for d in lastword)
    assert all(any(f"{d['context']} {d['target']}." in a for a in articles) for d in lastword)


def _loglikelihood(model, lm, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) and whether greedy decoding gives it, from the model's logits
    (lm-eval's tokenisation of the pair, `HFLM._encode_pair`, and its left truncation to the
    model's length)."""
    context_ids, continuation_ids = lm._encode_pair(context, continuation)
    whole = (context_ids + continuation_ids)[-(lm.max_length + 1):]
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=torch.tensor([whole[:-1]])).logits[0].double(), dim=-1)
    scored = logprobs[-len(continuation_ids):]  # position j predicts token j + 1
    target = torch.tensor(continuation_ids)
    return float(scored.gather(1, target[:, None]).sum()), bool((scored.argmax(-1) == target).all())


def test_local_task_metrics_are_those_of_a_direct_computation(tiny):
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = tiny
    limit = 6
    result = lm_eval_tasks(model, tokenizer, ["lrsweep_lee_cloze", "lrsweep_lee_lastword"],
                           include_path=[LOCAL_TASKS], limit=limit, batch_size=4)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    docs = [json.loads(line) for line in (LOCAL_TASKS / "lee_cloze.jsonl").read_text().splitlines()[:limit]]
    acc, acc_norm = [], []
    for doc in docs:
        lls = [_loglikelihood(model, lm, doc["context"], " " + c)[0] for c in doc["choices"]]
        acc.append(max(range(4), key=lambda i: lls[i]) == doc["label"])
        acc_norm.append(max(range(4), key=lambda i: lls[i] / len(doc["choices"][i])) == doc["label"])
    assert result.metrics["lrsweep_lee_cloze/acc"] == pytest.approx(sum(acc) / limit)
    assert result.metrics["lrsweep_lee_cloze/acc_norm"] == pytest.approx(sum(acc_norm) / limit)
    p = sum(acc) / limit
    assert result.metrics["lrsweep_lee_cloze/acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (limit - 1)))

    docs = [json.loads(line) for line in (LOCAL_TASKS / "lee_lastword.jsonl").read_text().splitlines()[:limit]]
    scored = [_loglikelihood(model, lm, d["context"], " " + d["target"]) for d in docs]
    assert result.metrics["lrsweep_lee_lastword/perplexity"] == pytest.approx(
        math.exp(-sum(ll for ll, _ in scored) / limit), rel=1e-4)
    assert result.metrics["lrsweep_lee_lastword/acc"] == sum(g for _, g in scored) / limit
    assert result.samples == {"lrsweep_lee_cloze": limit, "lrsweep_lee_lastword": limit}


def test_context_perplexity_is_the_perplexity_of_every_full_window(tiny, corpus):
    model, tokenizer = tiny
    assert context_length(model) == 512  # the tiny model's positions
    result = context_perplexity(model, tokenizer, f"path:{corpus}", seq_len=64)
    windows = draw_windows(f"path:{corpus}", tokenizer, 64, {"eval": None})["eval"]
    assert tokenizer("a")["input_ids"] == tokenizer("a", add_special_tokens=False)["input_ids"]  # no BOS added
    tokens = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in load_documents(f"path:{corpus}"))
    assert windows.shape[0] == result.extra["windows"] == tokens // 64  # documents + eos each, in whole windows
    assert result.value == pytest.approx(perplexity(model, windows).value, rel=1e-9)
    with pytest.raises(UserInputError, match="exceeds the model's 512 positions"):
        context_perplexity(model, tokenizer, f"path:{corpus}", seq_len=1024)


def test_evaluate_runs_the_local_tasks_on_a_compact_export_and_the_dense_model(exports, corpus, tmp_path, capsys):
    compact, dense = exports
    argv = ("--tasks", "lrsweep_local", "--limit", 3, "--perplexity", f"path:{corpus}", "--seq-len", 64)
    code, out, err = cli(capsys, "evaluate", compact, *argv, "--out", tmp_path / "compact.json")
    assert code == 0, err
    saved = json.loads((tmp_path / "compact.json").read_text())
    metrics = saved["metrics"]
    tasks = ("lrsweep_lee_cloze", "lrsweep_lee_lastword", "lrsweep_lee_documents")
    assert {k.partition("/")[0] for k in metrics} == {*tasks, "context_ppl"}
    assert {"lrsweep_lee_cloze/acc_stderr", "lrsweep_lee_lastword/perplexity_stderr"} <= set(metrics)
    assert saved["details"]["documents"] == dict.fromkeys(tasks, 3) and set(saved["seconds"]) == {"lm_eval", "context_ppl"}
    assert all(f"{t}" in out for t in tasks) and "context_ppl" in out
    # the dense export of the same model gives the same numbers ...
    assert cli(capsys, "evaluate", dense, *argv, "--out", tmp_path / "dense.json")[0] == 0
    for key, value in json.loads((tmp_path / "dense.json").read_text())["metrics"].items():
        assert value == pytest.approx(metrics[key], rel=1e-3, abs=1e-6), key
    # ... and the dense (uncompressed) model, from its source, other ones
    code, _, err = cli(capsys, "evaluate", "tiny:llama", *argv, "--out", tmp_path / "source.json")
    assert code == 0, err
    source = json.loads((tmp_path / "source.json").read_text())["metrics"]
    assert source["context_ppl/perplexity"] != pytest.approx(metrics["context_ppl/perplexity"], rel=1e-3)


def test_evaluate_scores_a_classifier_on_labelled_data(tmp_path, capsys):
    loaded = load_model("tiny:bert", task="classification", num_labels=2, seed=0)
    rows = [f"{'good fine nice' if i % 2 else 'bad poor sad'} {i},{['neg', 'pos'][i % 2]}" for i in range(60)]
    data = tmp_path / "reviews.csv"
    data.write_text("text,label\n" + "\n".join(rows) + "\n")
    loaded.model.config.id2label = {0: "neg", 1: "pos"}
    folder = save_compressed(loaded.model, tmp_path / "cls", tokenizer=loaded.tokenizer)
    code, out, err = cli(capsys, "evaluate", folder, "--labelled", f"path:{data}", "--out", tmp_path / "c.json")
    assert code == 0, err
    metrics = json.loads((tmp_path / "c.json").read_text())["metrics"]
    expected = classification_metrics(loaded.model, loaded.tokenizer, load_labelled(f"path:{data}").test,
                                      max_length=512)
    assert metrics == {"classification/accuracy": expected.value,
                       "classification/macro_f1": expected.extra["macro_f1"]}
    code, _, err = cli(capsys, "evaluate", folder, "--tasks", "lrsweep_local")
    assert code == 2 and "need a causal LM" in err


@pytest.mark.slow
def test_evaluate_scores_minilm_on_tweets(tmp_path):
    """The real encoder (compressed ones are the tiny models' business above): MiniLM with a
    three-way head, saved as a compact folder, scored on the test split of the tweets."""
    loaded = load_model("packaged:minilm", task="classification", num_labels=3, seed=0)
    tweets = load_labelled("packaged:tweets", seed=0)
    loaded.model.config.id2label = dict(enumerate(tweets.label_names))
    folder = save_compressed(loaded.model, tmp_path / "minilm", tokenizer=loaded.tokenizer)
    result = evaluate(folder, labelled="packaged:tweets", limit=64, seq_len=64)
    expected = classification_metrics(loaded.model, loaded.tokenizer, tweets.test[:64], max_length=64)
    assert result.metrics["classification/accuracy"] == expected.value
    assert result.details["classification"] == {"source": "packaged:tweets", "split": "test", "examples": 64}


def test_bad_requests_exit_2_before_any_work(exports, tmp_path, capsys):
    compact, _ = exports
    cases = {
        "nothing to measure": ((compact,), "nothing to measure"),
        "a hub task offline": ((compact, "--tasks", "piqa", "--limit", 2), "need the network"),
        "unknown text source": ((compact, "--perplexity", "packaged:nope"), "packaged:nope"),
        "labels for an LM": ((compact, "--labelled", "packaged:tweets"), "scores a classifier"),
        "output is a folder": ((compact, "--tasks", "lrsweep_local", "--out", tmp_path), "is a folder"),
        "not a model": ((tmp_path,), "neither a folder written by `lrsweep export`"),
    }
    for name, (argv, message) in cases.items():
        code, _, err = cli(capsys, "evaluate", *argv)
        assert code == 2 and message in err and "Traceback" not in err, (name, err)
