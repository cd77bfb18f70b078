"""`lrsweep evaluate` and the `final_eval` sweep stage: standard numbers for one model.

For a causal LM: lm-evaluation-harness tasks (`trainables.harness.lm_eval_tasks`) and perplexity at
the model's full context over a text source (`trainables.harness.context_perplexity`); for a
sequence classifier: accuracy and macro-F1 on the test split of a labelled source. The model is an
exported folder (compact or dense layout, `compression.load_compressed`), a model source
(`packaged:smollm2-135m`, `hf:<id>`, `path:<dir>`: the dense model), or a model object.

The local lm-eval tasks shipped in `sweeps/lm_eval_tasks/` (tag `lrsweep_local`: a multiple-choice
cloze, a last-word task and whole-document perplexity, all from `packaged:lee`) need no network;
the standard names (`trainables.harness.STANDARD_TASKS`: wikitext, piqa, arc_easy, ...) fetch their
data sets from the hub.

    from sweeps import evaluate
    result = evaluate("best/", tasks=["lrsweep_local"], limit=100, perplexity="packaged:lee")
    result.table()            # task, metric, value, stderr
    result.metrics            # {"lrsweep_lee_cloze/acc": 0.41, "lrsweep_lee_cloze/acc_stderr": 0.03, ...}
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from compression.errors import UserInputError

log = logging.getLogger("lrsweep")

LOCAL_TASKS = Path(__file__).parent / "lm_eval_tasks"
CONTEXT_TASK = "context_ppl"      # the name full-context perplexity goes by in the metrics
CLASSIFICATION_TASK = "classification"


@dataclass(frozen=True)
class EvalSettings:
    """What to measure. tasks: lm-eval names (local or standard); limit: documents per task;
    perplexity: a text source for full-context perplexity (seq_len default: the model's context,
    at most 8192; max_windows: a seeded subset of the windows); labelled: for a classifier, the
    labelled source whose test split it is scored on."""

    tasks: tuple[str, ...] = ()
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    perplexity: str | None = None
    seq_len: int | None = None
    max_windows: int | None = None
    labelled: str | None = None
    seed: int = 0

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class Evaluation:
    """The numbers of one model: `metrics` {"task/metric": value, "task/metric_stderr": its
    standard error}, `seconds` per part ("lm_eval", "context_ppl", "classification"), and how they
    were measured (`details`: settings, documents per task, the perplexity context)."""

    model: str
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        """One row per task metric: task, metric, value, stderr (NaN where there is none)."""
        rows = []
        for key, value in self.metrics.items():
            if key.endswith("_stderr"):
                continue
            task, _, metric = key.partition("/")
            rows.append({"task": task, "metric": metric, "value": value,
                         "stderr": self.metrics.get(f"{key}_stderr", math.nan)})
        return pd.DataFrame(rows, columns=["task", "metric", "value", "stderr"])

    def to_dict(self) -> dict:
        return asdict(self)

    def record(self) -> dict:
        """What the results table keeps (`TrialRow.final_eval`): the metrics, "seconds/<part>",
        and the settings (not expanded into columns)."""
        return {**self.metrics, **{f"seconds/{k}": v for k, v in self.seconds.items()},
                "settings": self.details.get("settings", {})}

    def describe(self) -> str:
        table = self.table()
        lines = [f"{self.model}:"]
        for row in table.itertuples():
            stderr = f" +- {row.stderr:.4g}" if math.isfinite(row.stderr) else ""
            lines.append(f"  {row.task:<28} {row.metric:<18} {row.value:>12.4f}{stderr}")
        lines.append("  time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        return "\n".join(lines)


def _kind(model) -> str:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "classifier"
    if name.endswith("ForCausalLM"):
        return "causal"
    raise UserInputError(f"evaluate takes causal language models and sequence classifiers, not a {name}")


def check_settings(settings: EvalSettings, kind: str) -> None:
    """Refuse what the model cannot be asked (before anything runs)."""
    if kind == "causal":
        if settings.labelled:
            raise UserInputError("labelled data scores a classifier; this is a causal LM: use tasks and/or perplexity")
        if not settings.tasks and not settings.perplexity:
            raise UserInputError("nothing to measure: give lm-eval tasks (e.g. lrsweep_local, or arc_easy with a "
                                 "network) and/or a text source for full-context perplexity (e.g. packaged:lee)")
    else:
        if settings.tasks or settings.perplexity:
            raise UserInputError("lm-eval tasks and perplexity need a causal LM; a classifier is scored on "
                                 "labelled data (e.g. labelled: packaged:tweets)")
        if not settings.labelled:
            raise UserInputError("a classifier needs labelled data to be scored on (e.g. packaged:tweets: its "
                                 "test split)")


def measure(model, tokenizer, settings: EvalSettings, name: str = "model") -> Evaluation:
    """The numbers `settings` asks for, of a model object (where it is, in eval mode)."""
    from trainables.harness import context_perplexity, lm_eval_tasks

    kind = _kind(model)
    check_settings(settings, kind)
    result = Evaluation(model=name, details={"settings": settings.to_dict()})
    if settings.tasks:
        log.info(f"{name}: lm-eval {', '.join(settings.tasks)}"
                 + (f" (at most {settings.limit} documents each)" if settings.limit else ""))
        harness = lm_eval_tasks(model, tokenizer, settings.tasks, include_path=[LOCAL_TASKS], limit=settings.limit,
                                batch_size=settings.batch_size, num_fewshot=settings.num_fewshot, seed=settings.seed)
        result.metrics.update(harness.metrics)
        result.seconds["lm_eval"] = harness.seconds
        result.details.update(documents=harness.samples, lm_eval=harness.settings)
    if settings.perplexity:
        log.info(f"{name}: perplexity of {settings.perplexity} at the full context")
        ppl = context_perplexity(model, tokenizer, settings.perplexity, seq_len=settings.seq_len,
                                 max_windows=settings.max_windows, seed=settings.seed)
        result.metrics[f"{CONTEXT_TASK}/perplexity"] = ppl.value
        result.seconds[CONTEXT_TASK] = ppl.seconds
        result.details[CONTEXT_TASK] = {"source": settings.perplexity, "seq_len": int(ppl.extra["seq_len"]),
                                        "windows": int(ppl.extra["windows"]), "tokens": ppl.tokens}
    if settings.labelled:
        result.metrics.update(_classification(model, tokenizer, settings, result))
    return result


def _classification(model, tokenizer, settings: EvalSettings, result: Evaluation) -> dict[str, float]:
    from trainables.evaluation import classification_metrics
    from trainables.harness import context_length
    from trainables.sources import load_labelled

    data = load_labelled(settings.labelled, seed=settings.seed)
    names = [str(v) for _, v in sorted((model.config.id2label or {}).items())]
    if names and not all(n.startswith("LABEL_") for n in names) and names != data.label_names:
        raise UserInputError(f"the classifier's labels {names} are not those of {settings.labelled} "
                             f"({data.label_names}); score it on the data it was trained for")
    examples = data.test[: settings.limit] if settings.limit else data.test
    scored = classification_metrics(model, tokenizer, examples, batch_size=settings.batch_size,
                                    max_length=settings.seq_len or context_length(model))
    result.seconds[CLASSIFICATION_TASK] = scored.seconds
    result.details[CLASSIFICATION_TASK] = {"source": settings.labelled, "split": "test", "examples": len(examples)}
    return {f"{CLASSIFICATION_TASK}/accuracy": scored.value, f"{CLASSIFICATION_TASK}/macro_f1": scored.extra["macro_f1"]}


def load_for_evaluation(model: str | Path, device: str = "cpu"):
    """(model, tokenizer, name) of an exported folder (it holds lowrank.json) or a model source."""
    from compression.io import INFO_FILE, load_compressed
    from trainables.sources import load_model

    text = str(model)
    if Path(text).is_dir() and (Path(text) / INFO_FILE).is_file():
        loaded, tokenizer, _ = load_compressed(text, device=device)
        if tokenizer is None:
            raise UserInputError(f"{text} has no tokenizer files; export it with `lrsweep export` (which saves them)")
        return loaded, tokenizer, text
    if ":" not in text:
        raise UserInputError(f"model {text!r} is neither a folder written by `lrsweep export` (with lowrank.json) "
                             f"nor a model source (packaged:<name>, hf:<id>, path:<dir>, tiny:<arch>)")
    try:
        loaded = load_model(text, task="causal-lm")
    except UserInputError as e:
        if "is an encoder" not in str(e):
            raise
        loaded = load_model(text, task="classification")  # the checkpoint's own head and labels
    return loaded.model.to(device), loaded.tokenizer, text


def evaluate(model, tokenizer=None, tasks=(), limit: int | None = None, batch_size: int = 8,
             num_fewshot: int | None = None, perplexity: str | None = None, seq_len: int | None = None,
             max_windows: int | None = None, labelled: str | None = None, device: str = "cpu", seed: int = 0,
             out: str | Path | None = None) -> Evaluation:
    """`lrsweep evaluate`: the numbers of `model` (an exported folder, a model source, or a model
    object with its `tokenizer`; see the module docstring). `out`: also write them as JSON."""
    from trainables.sources import check_source

    settings = EvalSettings(tasks=tuple(tasks), limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                            perplexity=perplexity, seq_len=seq_len, max_windows=max_windows, labelled=labelled,
                            seed=seed)
    for source, kind in ((perplexity, "text"), (labelled, "labelled")):
        if source is not None:
            check_source(source, kind)
    if out is not None and Path(out).is_dir():
        raise UserInputError(f"output {out} is a folder; give the JSON file to write, e.g. {Path(out) / 'eval.json'}")
    if isinstance(model, (str, Path)):
        model, tokenizer, name = load_for_evaluation(model, device)
    else:
        if tokenizer is None:
            raise UserInputError("evaluating a model object needs its tokenizer")
        model, name = model.to(device), type(model).__name__
    check_settings(settings, _kind(model))
    result = measure(model, tokenizer, settings, name=name)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    return result
