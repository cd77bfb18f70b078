"""`lrsweep`: validate and run compression sweeps.

    lrsweep --version
    lrsweep sources                      models and data the sweep files can name
    lrsweep validate FILE                check a sweep file; print its trials (starts nothing)
    lrsweep run FILE [--address A] [--storage S] [--name N] [--resume]
    lrsweep calibrate FILE               compute (or find) the calibration statistics only
    lrsweep quickstart                   run the packaged example sweeps/examples/quickstart.yaml

A mistake in the input prints "lrsweep: error: <what and what is allowed>" and exits with
status 2, before anything is started or written.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources

from sweeps import __version__

EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrsweep", description="Ray Tune sweeps that compress transformer "
                                     "language models with low-rank methods.")
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
    return parser


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
    from sweeps.runner import apply_overrides
    from sweeps.spec import load_spec

    return apply_overrides(load_spec(args.file), storage=getattr(args, "storage", None),
                           name=getattr(args, "name", None))


def _validate(args: argparse.Namespace) -> int:
    from sweeps.runner import check_storage, sweep_directory
    from sweeps.spec import check_resources, expand, local_resources, optuna_choices, trial_count

    spec = _load(args)
    if args.address is None:
        check_resources(spec, *local_resources())
    directory = sweep_directory(spec.storage, spec.name)
    stored = check_storage(spec, directory, args.resume)
    task, cal = spec.task_settings(), spec.calibration_settings()
    r = spec.resources
    print(f"sweep {spec.name}: {trial_count(spec)} trial(s) on {spec.model} ({spec.task.type})")
    print(f"  evaluation: {task['eval']}; calibration: {cal['samples']} samples of {cal['source']} "
          f"({cal['seq_len']} tokens); finetune: {spec.finetune.steps} steps")
    print(f"  per trial: {r.cpu:g} CPU, {r.gpu:g} GPU; at most "
          f"{r.max_concurrent if r.max_concurrent else 'as many as fit'} at once")
    print(f"  results: {directory}" + (" (holds this sweep already)" if stored else ""))
    if spec.optuna is None:
        print(f"\n{'trial_id':<12}  {'method':<10}  {'allocation':<10}  {'ratio':>6}  options")
        for c in expand(spec):
            options = ", ".join(f"{k}={v}" for k, v in c["options"].items()) or "-"
            print(f"{c['trial_id']:<12}  {c['method']:<10}  {c['allocation']:<10}  {c['ratio']:>6.2f}  {options}")
    else:
        o = spec.optuna
        choices = ", ".join(f"{k} in {v}" for k, v in optuna_choices(spec).items())
        objective = "metric" if not o.multi else "metric and size (Pareto front)"
        print(f"\nOptuna ({o.sampler}, seed {spec.seed if o.seed is None else o.seed}): {o.trials} trials, "
              f"one ratio per {o.granularity} in [{o.bounds[0]:g}, {o.bounds[1]:g}] rescaled to the budget; "
              f"{choices}; objective: {objective}")
    return 0


def _run(args: argparse.Namespace, file: str | None = None) -> int:
    from sweeps.results import format_table
    from sweeps.runner import run_sweep

    if file is not None:
        args.file = file
    spec = _load(args)
    out = run_sweep(spec, address=args.address, resume=args.resume)
    print()
    print(format_table(out["table"]))
    print(f"\ntable:  {out['directory']}/trials.parquet")
    print(f"report: {out['report']}")
    print(f"time:   {out['timing']['text']}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from sweeps.runner import calibrate, calibration_cache

    prepared = calibrate(_load(args))
    print(f"statistics: {calibration_cache() / (prepared.calibration_key + '.safetensors')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from compression.errors import UserInputError

    try:
        if args.command == "sources":
            return _sources()
        if args.command == "validate":
            return _validate(args)
        if args.command == "run":
            return _run(args)
        if args.command == "calibrate":
            return _calibrate(args)
        return _run(args, file=quickstart_file())
    except UserInputError as e:
        print(f"lrsweep: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("lrsweep: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
