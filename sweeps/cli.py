"""`lrsweep`: validate and run compression sweeps.

    lrsweep --version
    lrsweep sources                      models and data the sweep files can name
    lrsweep validate FILE                check a sweep file; print its trials (starts nothing)
    lrsweep run FILE [--address A] [--storage S] [--name N] [--resume]
    lrsweep calibrate FILE               compute (or find) the calibration statistics only
    lrsweep quickstart                   run the packaged example sweeps/examples/quickstart.yaml
    lrsweep report DIR [--out OUT]       report.md and plots again, from DIR/trials.parquet alone
    lrsweep compare DIR_A DIR_B          the same trials of two sweeps side by side
    lrsweep export DIR (--trial ID | --best [--max-ratio R | --min-ratio R]) --out OUT [--format dense]
    lrsweep evaluate MODEL [--tasks T,...] [--perplexity SOURCE]   lm-eval tasks and full-context perplexity
    lrsweep generate OUT "prompt"        run an exported causal LM
    lrsweep classify OUT "text"          run an exported classifier

A mistake in the input prints "lrsweep: error: <what and what is allowed>" and exits with
status 2, before anything is started or written. Nothing lrsweep reads runs code (no serialised
Python objects, no code of a model folder), and it never asks anything on stdin.

exit statuses:
  0    done (`run`: every trial has a final row, some of which may be failed trials)
  2    a mistake in the input: nothing was started or written
  3    `run`: trials are left to run (Ctrl-C, or limits.sweep_seconds ran out): `--resume` runs them
  4    `run`: every trial of the sweep failed (their errors are in the table and report.md)
  130  interrupted (Ctrl-C) in any other command
  141  the reader of the output went away (e.g. `lrsweep compare A B | head`)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib import resources

from sweeps import __version__

EXIT_USER_ERROR = 2
UNFINISHED = 3  # `run` ended with trials left to run (interrupted, or out of time): --resume runs them
ALL_FAILED = 4  # `run`: no trial of the sweep finished
INTERRUPTED = 130  # 128 + SIGINT
BROKEN_PIPE = 141  # 128 + SIGPIPE, what a Unix tool dies with when its reader goes away


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrsweep", description="Ray Tune sweeps that compress transformer "
                                     "language models with low-rank methods.", epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lrsweep {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser("sources", help="list the models and data a sweep file can name")

    def sweep_options(p: argparse.ArgumentParser, with_file: bool = True) -> None:
        if with_file:
            p.add_argument("file", metavar="FILE", help="sweep file (YAML)")
        p.add_argument("--address", help="Ray cluster address (default: a local Ray on this machine)")
        p.add_argument("--storage", help="results root, a local folder or a URI (overrides the file's `storage`)")
        p.add_argument("--name", help="sweep name (overrides the file's `name`)")
        p.add_argument("--resume", action="store_true",
                       help="continue the sweep stored under this name: keep its finished trials, run the rest")

    sweep_options(sub.add_parser("validate", help="check a sweep file and print its trials; starts nothing"))
    sweep_options(sub.add_parser("run", help="run a sweep"))
    calibrate = sub.add_parser("calibrate", help="compute (or find cached) calibration statistics, without Ray")
    calibrate.add_argument("file", metavar="FILE", help="sweep file (YAML)")
    sweep_options(sub.add_parser("quickstart", help="run the packaged example sweep (SmolLM2-135M)"), with_file=False)
    _analysis_commands(sub)
    return parser


def _analysis_commands(sub) -> None:
    report = sub.add_parser("report", help="write report.md and its plots again from a sweep's trials.parquet")
    report.add_argument("experiment", metavar="DIR", help="the sweep's folder (<storage>/<name>)")
    report.add_argument("--out", metavar="OUT", help="where to write them (default: DIR)")
    compare = sub.add_parser("compare", help="the same trials of two sweeps side by side, with differences")
    compare.add_argument("a", metavar="DIR_A", help="folder of the first sweep")
    compare.add_argument("b", metavar="DIR_B", help="folder of the second sweep")
    export = sub.add_parser("export", help="rebuild a trial's compressed model and save it as a Hugging Face folder")
    export.add_argument("experiment", metavar="DIR", help="the sweep's folder (<storage>/<name>)")
    which = export.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", metavar="ID", help="the trial id (or a unique prefix of at least 4 characters)")
    which.add_argument("--best", action="store_true", help="the finished trial with the best metric")
    bound = export.add_mutually_exclusive_group()
    bound.add_argument("--max-ratio", type=float, metavar="R",
                       help="with --best: among trials removing at most R of the targeted parameters")
    bound.add_argument("--min-ratio", type=float, metavar="R",
                       help="with --best: among trials removing at least R of the targeted parameters")
    export.add_argument("--out", required=True, metavar="OUT", help="output folder (created; replaced if it "
                        "holds an exported model)")
    export.add_argument("--before-finetune", action="store_true",
                        help="export the compressed model without the trial's finetuned weights")
    export.add_argument("--device", default="cpu", help="where to rebuild it (default: cpu)")
    export.add_argument("--format", choices=("compact", "dense"), default="compact",
                        help="compact (default): the factors at the compressed size, for "
                             "compression.load_compressed (plain transformers refuses it); dense: multiplied back "
                             "into the dense shapes, a standard folder plain transformers, lm-eval and serving "
                             "stacks load (no size gain)")
    export.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="dtype of the saved weights (default: the model's, float32)")
    export.add_argument("--max-shard-size", metavar="SIZE", help="largest safetensors file, e.g. 2GB or 500MB "
                        "(default 50GB); larger models are sharded with an index file, as transformers does")
    evaluate = sub.add_parser(
        "evaluate", help="standard numbers for a model: lm-eval tasks, full-context perplexity, or a "
                         "classifier's accuracy", description="Evaluate an exported model (compact or dense) or a "
        "model source (the dense model). Local lm-eval tasks (no network): lrsweep_local (= lrsweep_lee_cloze, "
        "lrsweep_lee_lastword, lrsweep_lee_documents). With a network, the standard ones: wikitext, piqa, "
        "arc_easy, arc_challenge, hellaswag, winogrande, boolq, openbookqa, lambada_openai.")
    evaluate.add_argument("model", metavar="MODEL", help="a folder written by `lrsweep export`, or a model source "
                          "(packaged:smollm2-135m, hf:<id>, path:<dir>)")
    evaluate.add_argument("--tasks", type=lambda s: [t for t in s.split(",") if t], default=[],
                          help="lm-eval task names, comma-separated (e.g. lrsweep_local or piqa,arc_easy)")
    evaluate.add_argument("--limit", type=int, help="at most this many documents per task")
    evaluate.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own, 0 here)")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--perplexity", metavar="SOURCE", help="text source for perplexity at the full "
                          "context (e.g. packaged:lee): non-overlapping windows of --seq-len tokens")
    evaluate.add_argument("--seq-len", type=int, help="perplexity context (default: the model's, at most 8192); "
                          "for a classifier, its max length")
    evaluate.add_argument("--max-windows", type=int, help="perplexity over a seeded subset of this many windows")
    evaluate.add_argument("--labelled", metavar="SOURCE", help="a classifier: score it on the test split of this "
                          "labelled source (e.g. packaged:tweets)")
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--out", default="evaluation.json", help="JSON file of every metric with its stderr "
                          "(default: evaluation.json)")
    generate = sub.add_parser("generate", help="continue a prompt with an exported causal language model")
    generate.add_argument("model", metavar="OUT", help="folder written by `lrsweep export`")
    generate.add_argument("prompt")
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--device", default="cpu")
    classify = sub.add_parser("classify", help="classify a text with an exported sequence classifier")
    classify.add_argument("model", metavar="OUT", help="folder written by `lrsweep export`")
    classify.add_argument("text")
    classify.add_argument("--device", default="cpu")


def quickstart_file() -> str:
    return str(resources.files("sweeps") / "examples" / "quickstart.yaml")


def _sources() -> int:
    from trainables.sources import describe_sources

    rows = describe_sources()
    width = max(len(r["name"]) for r in rows)
    kinds = max(len(r["kind"]) for r in rows)
    print(f"{'source':<{width}}  {'kind':<{kinds}}  installed  description")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['kind']:<{kinds}}  {'yes' if r['installed'] else 'no':<9}  {r['description']}")
    missing = [r for r in rows if not r["installed"] and r["install"]]
    if missing:
        print("\nto install the missing ones:")
        for r in missing:
            print(f"  {r['install']}")
    return 0


def _load(args: argparse.Namespace):
    import re

    from compression.errors import UserInputError
    from sweeps.api import load_sweep
    from sweeps.spec import NAME_PATTERN

    name = getattr(args, "name", None)
    if name is not None and not re.fullmatch(NAME_PATTERN, name):
        raise UserInputError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (starting with a letter or digit)")
    return load_sweep(args.file, storage=getattr(args, "storage", None), name=name)


def _validate(args: argparse.Namespace) -> int:
    from sweeps.api import plan_sweep

    plan = plan_sweep(_load(args), address=args.address, resume=args.resume)
    spec = plan.spec
    task, cal = spec.task_settings(), spec.calibration_settings()
    r = spec.resources
    print(f"sweep {spec.name}: {plan.trial_count} trial(s) on {spec.model} ({spec.task.type})")
    print(f"  evaluation: {task['eval']}; calibration: {cal['samples']} samples of {cal['source']} "
          f"({cal['seq_len']} tokens{'; ' + cal['fisher'] + ' Fisher' if 'fisher' in cal else ''}); "
          f"finetune: {spec.finetune.steps} steps")
    print(f"  methods: {', '.join(repr(m) for m in plan.methods)}")
    print(f"  per trial: {r.cpu:g} CPU, {r.gpu:g} GPU; at most "
          f"{r.max_concurrent if r.max_concurrent else 'as many as fit'} at once")
    lim = spec.limits
    print(f"  limits: sweep {f'{lim.sweep_seconds:g} s' if lim.sweep_seconds else 'none'}, trial "
          f"{f'{lim.trial_seconds:g} s' if lim.trial_seconds else 'none'}, calibration statistics "
          f"{f'{lim.stats_memory_gb:g} GB' if lim.stats_memory_gb else 'half the available memory'}, "
          f"{lim.retries} retries of a crashed trial")
    if spec.final_eval is not None:
        fe = spec.final_eval
        parts = ([f"lm-eval {', '.join(fe.tasks)}"] if fe.tasks else []) + \
            ([f"perplexity of {fe.perplexity} at the full context"] if fe.perplexity else [])
        print(f"  final_eval ({fe.trials}, on {fe.device}): {'; '.join(parts)}")
    if spec.tracking is not None:
        print(f"  tracking: {', '.join(k for k, v in spec.tracking if v is not None) or 'none'}")
    print(f"  results: {plan.directory}" + (" (holds this sweep already)" if plan.stored else ""))
    if spec.optuna is None:
        print(f"\n{'trial_id':<12}  {'method':<10}  {'allocation':<10}  {'ratio':>6}  options")
        for c in plan.trials:
            options = ", ".join(f"{k}={v}" for k, v in c.options.items()) or "-"
            print(f"{c.trial_id:<12}  {c.method:<10}  {c.allocation:<10}  {c.ratio:>6.2f}  {options}")
    else:
        o = spec.optuna
        choices = ", ".join(f"{k} in {v}" for k, v in plan.optuna_choices.items())
        objective = "metric" if not o.multi else "metric and size (Pareto front)"
        print(f"\nOptuna ({o.sampler}, seed {spec.seed if o.seed is None else o.seed}): {o.trials} trials, "
              f"one ratio per {o.granularity} in [{o.bounds[0]:g}, {o.bounds[1]:g}] rescaled to the budget; "
              f"{choices}; objective: {objective}")
    return 0


def _run(args: argparse.Namespace, file: str | None = None) -> int:
    from sweeps.report import format_table
    from sweeps.runner import run_sweep

    if file is not None:
        args.file = file
    spec = _load(args)
    try:
        out = run_sweep(spec, address=args.address, resume=args.resume)
    except KeyboardInterrupt:
        print(f"lrsweep: interrupted; `lrsweep run {args.file} --resume` runs what is left (finished trials "
              f"are kept)", file=sys.stderr)
        return UNFINISHED
    print()
    print(format_table(out.table))
    print(f"\ntable:  {out.directory}/trials.parquet")
    print(f"report: {out.report}")
    print(f"time:   {out.timing.describe()}")
    if out.faults.retried or out.faults.restarts:
        print(f"faults: {out.faults.describe()}")
    if out.faults.unfinished:
        print(f"lrsweep: {out.faults.unfinished} trial(s) did not finish (interrupted, or limits.sweep_seconds ran "
              f"out); `lrsweep run {args.file} --resume` runs them", file=sys.stderr)
        return UNFINISHED
    trials = out.table[out.table["method"] != "dense"]
    if len(trials) and (trials["status"] == "error").all():
        print(f"lrsweep: every trial of the sweep failed ({len(trials)}); their errors are in the table and in "
              f"{out.report}", file=sys.stderr)
        return ALL_FAILED
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from sweeps.prepare import calibration_cache, prepare

    prepared = prepare(_load(args))
    print(f"statistics: {calibration_cache() / (prepared.calibration_key + '.safetensors')}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from sweeps.report import regenerate

    path, figures = regenerate(args.experiment, args.out)
    print(f"report: {path}")
    for name in figures:
        print(f"plot:   {name}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from sweeps.analysis import compare
    from sweeps.report import format_compare
    from sweeps.table import load_results

    print(format_compare(compare(load_results(args.a), load_results(args.b)), args.a, args.b))
    return 0


def _export(args: argparse.Namespace) -> int:
    from compression.errors import UserInputError
    from sweeps.export import describe, export_trial

    if args.trial is not None and (args.max_ratio is not None or args.min_ratio is not None):
        raise UserInputError("--max-ratio and --min-ratio choose among trials with --best; --trial names one")
    path, built = export_trial(args.experiment, args.out, trial=args.trial, best=args.best, max_ratio=args.max_ratio,
                               min_ratio=args.min_ratio, before_finetune=args.before_finetune, device=args.device,
                               format=args.format, dtype=args.dtype, max_shard_size=_size(args.max_shard_size))
    print(f"exported {describe(built)}")
    run = f"`lrsweep {'classify' if built.label_names else 'generate'} {path} ...`"
    if args.format == "compact":
        print(f"to {path}, compact (load it with compression.load_compressed, or run {run}; "
              f"--format dense writes a folder plain transformers loads)")
    else:
        print(f"to {path}, dense: plain transformers loads it (AutoModel*.from_pretrained), and so does {run}; "
              f"it holds the dense model's parameter count (no size gain)")
    return 0


def _size(text: str | None) -> int | str | None:
    """--max-shard-size: a number of bytes or a size with its unit."""
    return int(text) if text is not None and text.isdigit() else text


def _evaluate(args: argparse.Namespace) -> int:
    from sweeps.evaluation import evaluate

    result = evaluate(args.model, tasks=args.tasks, limit=args.limit, batch_size=args.batch_size,
                      num_fewshot=args.num_fewshot, perplexity=args.perplexity, seq_len=args.seq_len,
                      max_windows=args.max_windows, labelled=args.labelled, device=args.device, out=args.out)
    print(result.describe())
    print(f"results: {args.out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from sweeps.export import generate

    print(args.prompt + generate(args.model, args.prompt, max_new_tokens=args.max_new_tokens, device=args.device))
    return 0


def _classify(args: argparse.Namespace) -> int:
    from sweeps.export import classify

    for label, p in classify(args.model, args.text, device=args.device):
        print(f"{label:<16} {100 * p:6.2f} %")
    return 0


_ANALYSIS = {"report": _report, "compare": _compare, "export": _export, "evaluate": _evaluate,
             "generate": _generate, "classify": _classify}


class _Progress(logging.Handler):
    """Prints the library's messages (logger "lrsweep") to the standard output of the moment."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stdout.write(self.format(record) + "\n")
        sys.stdout.flush()


def _show_progress() -> None:
    logger = logging.getLogger("lrsweep")
    if not any(isinstance(h, _Progress) for h in logger.handlers):
        logger.addHandler(_Progress())
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _command(args: argparse.Namespace) -> int:
    if args.command == "sources":
        return _sources()
    if args.command == "validate":
        return _validate(args)
    if args.command == "run":
        return _run(args)
    if args.command == "calibrate":
        return _calibrate(args)
    if args.command in _ANALYSIS:
        return _ANALYSIS[args.command](args)
    return _run(args, file=quickstart_file())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from compression.errors import UserInputError

    _show_progress()

    try:
        code = _command(args)
        sys.stdout.flush()  # a reader that went away shows here, not in Python's final flush
        return code
    except UserInputError as e:
        print(f"lrsweep: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("lrsweep: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:
        # the reader closed the pipe: say nothing more, and let Python's final flush go nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
