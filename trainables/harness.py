"""Standard numbers for a model object, comparable with the literature:

- `lm_eval_tasks`: lm-evaluation-harness tasks through its Python API
  (`lm_eval.simple_evaluate` on `HFLM(pretrained=<the model object>)`, so a compressed model runs
  as it is, low-rank layers and all);
- `context_perplexity`: perplexity at the model's own context length over a text source.

Nothing here needs the network unless a task's data set lives on the hub: tasks found in
`include_path` folders (the local tasks shipped with the sweeps) are indexed alone, and the
standard zero-shot tasks of compression papers (`STANDARD_TASKS`) are indexed from their own
folders of lm-eval instead of all of its 14,000 tasks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from compression.errors import UserInputError

from .evaluation import EvalResult, perplexity
from .sources import draw_windows

log = logging.getLogger("lrsweep")

# lm-eval task -> its folder in lm_eval/tasks: what compression papers report (WikiText-2
# perplexity, zero-shot PIQA, ARC, HellaSwag, WinoGrande, BoolQ, OpenBookQA, LAMBADA).
STANDARD_TASKS = {"wikitext": "wikitext", "piqa": "piqa", "arc_easy": "arc", "arc_challenge": "arc",
                  "hellaswag": "hellaswag", "winogrande": "winogrande", "boolq": "super_glue/boolq",
                  "openbookqa": "openbookqa", "lambada_openai": "lambada"}
CONTEXT_CAP = 8192  # default perplexity context: the model's, at most this (Gemma 3 has 32k positions)


@dataclass
class HarnessResult:
    """lm-eval's numbers: `metrics` maps "task/metric" to its value and "task/metric_stderr" to its
    standard error (where lm-eval gives one); `samples` the documents evaluated per task."""

    metrics: dict[str, float]
    samples: dict[str, int]
    seconds: float
    settings: dict = field(default_factory=dict)


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Environment variables set for the duration (lm-eval reads some of its switches there)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def task_manager(tasks: Sequence[str], include_path: Sequence[str | Path] = ()):
    """An lm-eval TaskManager that knows `tasks`, indexing as little as possible: the include
    folders, plus the folders of standard tasks, plus (only for other names) all of lm-eval's."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    folders = [str(p) for p in include_path]
    local = TaskManager(include_path=folders, include_defaults=False) if folders else None
    known = set(local.all_tasks) if local else set()
    if all(t in known for t in tasks):
        return local
    base = Path(lm_eval.__file__).parent / "tasks"
    if all(t in known or t in STANDARD_TASKS for t in tasks):
        standard = sorted({str(base / STANDARD_TASKS[t]) for t in tasks if t not in known})
        return TaskManager(include_path=folders + standard, include_defaults=False)
    log.info("indexing all lm-eval tasks (a minute or so) to find " + ", ".join(t for t in tasks if t not in known
                                                                              and t not in STANDARD_TASKS))
    manager = TaskManager(include_path=folders or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserInputError(f"lm-eval task(s) {', '.join(unknown)} do not exist; local tasks: "
                             f"{', '.join(sorted(known)) or 'none'}; standard ones: {', '.join(STANDARD_TASKS)} "
                             f"(`lm_eval ls tasks` lists all)")
    return manager


def _flatten(results: dict) -> dict[str, float]:
    """{"task/metric": value, "task/metric_stderr": stderr} from lm-eval's "results" section
    (keys "metric,filter"; the default filter "none" is left out of the name)."""
    out = {}
    for task, values in results.items():
        for key, value in values.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue  # alias, name, sample_len; "N/A" stderrs
            metric, _, filter_name = key.partition(",")
            name = metric if filter_name == "none" else f"{metric}[{filter_name}]"
            if name.endswith("_stderr") and not math.isfinite(value):
                continue
            out[f"{task}/{name}"] = float(value)
    return out


def lm_eval_tasks(model: nn.Module, tokenizer, tasks: Sequence[str], include_path: Sequence[str | Path] = (),
                  limit: int | None = None, batch_size: int = 8, num_fewshot: int | None = None,
                  bootstrap_iters: int = 1000, seed: int = 0) -> HarnessResult:
    """Run lm-eval `tasks` (names, tags or groups) on the model object where it is (its device).

    `limit`: at most this many documents per task (the first ones); `num_fewshot`: None keeps each
    task's own (0 for the local ones); `bootstrap_iters`: resamples for the standard error of
    metrics without a closed form (perplexity; run in this process, not a pool of forks)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tasks = list(tasks)
    if not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise UserInputError(f"tasks {tasks!r}: give lm-eval task names, e.g. lrsweep_local or arc_easy")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserInputError(f"limit must be a positive number of documents per task, got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    manager = task_manager(tasks, include_path)
    with _environment(DISABLE_MULTIPROC="1", TOKENIZERS_PARALLELISM="false"):
        try:
            loaded = manager.load(tasks)
        except Exception as e:  # noqa: BLE001 - a task's data set: datasets and hub errors of every kind
            raise UserInputError(f"lm-eval could not load the data of {', '.join(tasks)} ({type(e).__name__}: "
                                 f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); hub data sets "
                                 f"need the network (or the datasets cache); the local tasks (lrsweep_local) "
                                 f"need none") from None
        grouped = {t.task_name for g in loaded["groups"].values() for t in g.get_all_tasks()}
        chosen = [*loaded["groups"].values(), *(t for n, t in loaded["tasks"].items() if n not in grouped)]
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            output = simple_evaluate(model=lm, tasks=chosen, task_manager=manager, limit=limit,
                                     num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters, log_samples=False,
                                     random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                     fewshot_random_seed=seed)
        finally:
            model.train(was_training)
        seconds = time.perf_counter() - start
    samples = {t: int(n["effective"]) for t, n in (output.get("n-samples") or {}).items()}
    import lm_eval

    settings = {"tasks": tasks, "limit": limit, "num_fewshot": output.get("n-shot"), "batch_size": batch_size,
                "lm_eval_version": lm_eval.__version__}
    return HarnessResult(metrics=_flatten(output["results"]), samples=samples, seconds=seconds, settings=settings)


def context_length(model: nn.Module) -> int:
    """The model's own context (positions), at most CONTEXT_CAP."""
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not positions:
        raise UserInputError(f"{type(model).__name__} names no context length (max_position_embeddings); "
                             f"give seq_len")
    return min(int(positions), CONTEXT_CAP)


def context_perplexity(model: nn.Module, tokenizer, source: str, seq_len: int | None = None,
                       max_windows: int | None = None, batch_size: int = 1, seed: int = 0,
                       text_column: str | None = None) -> EvalResult:
    """Perplexity over non-overlapping windows of `seq_len` tokens (default: the model's context,
    `context_length`) of the text source.

    The protocol of WikiText-2 perplexity in compression papers: the documents, tokenized and
    joined with the end-of-text token, cut into consecutive windows of the full context (the tail
    shorter than a window dropped; a BOS first where the tokenizer adds one); every token of a
    window but the first is predicted from those before it in the window; exp of the mean NLL
    over all of them. `max_windows` evaluates a seeded random subset of the windows instead."""
    length = context_length(model) if seq_len is None else seq_len
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if seq_len is not None and positions and seq_len > positions:
        raise UserInputError(f"seq_len {seq_len} exceeds the model's {positions} positions")
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int)
                                    or max_windows < 1):
        raise UserInputError(f"max_windows must be a positive integer, got {max_windows!r}")
    windows = draw_windows(source, tokenizer, length, {"eval": max_windows}, seed=seed, text_column=text_column)
    result = perplexity(model, windows["eval"], batch_size=batch_size)
    result.extra["seq_len"] = length
    return result
