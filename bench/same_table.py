"""Are two trials tables the same results? Compares two trials.parquet files trial by trial and
column by column, leaving out what measures time (seconds_*, latency_ms_*, speedup) and where
Tune put a checkpoint (only whether there is one is compared); rank plans are compared on their
ranks and parameter counts.

    python bench/same_table.py A/trials.parquet B/trials.parquet [--rtol 0]

Prints every difference and exits 1 when there is one (with --rtol, floats within that relative
tolerance count as equal).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import pandas as pd

TIMING = ("seconds_calibration", "seconds_decompose", "seconds_compress", "seconds_eval", "seconds_finetune",
          "latency_ms_dense", "latency_ms_compressed", "speedup")
PLAN_KEYS = ("method", "allocation", "target_ratio", "ranks", "dense_params", "params", "predicted_loss")


def _missing(x) -> bool:
    return x is None or x is pd.NA or (isinstance(x, float) and math.isnan(x))


def _same(a, b, rtol: float) -> bool:
    if _missing(a) or _missing(b):
        return _missing(a) and _missing(b)
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (rtol > 0 and math.isclose(a, b, rel_tol=rtol))
    return a == b


def differences(a: pd.DataFrame, b: pd.DataFrame, rtol: float = 0.0) -> list[str]:
    out = []
    ids_a, ids_b = set(a["trial_id"]), set(b["trial_id"])
    out += [f"trial {t}: only in A" for t in sorted(ids_a - ids_b)]
    out += [f"trial {t}: only in B" for t in sorted(ids_b - ids_a)]
    a, b = a.set_index("trial_id"), b.set_index("trial_id")
    columns = [c for c in a.columns if c in b.columns and c not in TIMING]
    out += [f"column {c}: only in A" for c in a.columns if c not in b.columns]
    out += [f"column {c}: only in B" for c in b.columns if c not in a.columns]
    for trial in sorted(ids_a & ids_b):
        for col in columns:
            x, y = a.at[trial, col], b.at[trial, col]
            if col == "checkpoint":
                x, y = bool(x), bool(y)
            if col == "rank_plan":
                px, py = json.loads(x or "{}"), json.loads(y or "{}")
                x, y = ({k: px.get(k) for k in PLAN_KEYS}, {k: py.get(k) for k in PLAN_KEYS})
            if not _same(x, y, rtol):
                out.append(f"trial {trial} column {col}: A {str(x)[:80]!s} != B {str(y)[:80]!s}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--rtol", type=float, default=0.0)
    args = parser.parse_args()
    a, b = pd.read_parquet(args.a), pd.read_parquet(args.b)
    found = differences(a, b, args.rtol)
    for line in found:
        print(line)
    compared = len(set(a["trial_id"]) & set(b["trial_id"]))
    print(f"{compared} trials compared, {len(found)} difference(s) (timing columns and checkpoint paths left out)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
