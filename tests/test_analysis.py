"""Analysis of a real sweep's table (tiny llama, like test_sweep_e2e): typed loading, Pareto fronts
against brute force, the regenerated report and its plots, comparison of two experiments, and the
CLI's answers to bad input."""

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import sweeps
import sweeps.runner as runner
from compression.errors import UserInputError
from sweeps.analysis import best_per_ratio, best_trial, compare, pareto
from sweeps.cli import main
from sweeps.plots import plan_grid
from sweeps.report import regenerate
from sweeps.storage import TRIALS_FILE
from sweeps.table import COLUMNS, load_results, typed
from test_sweep_e2e import corpus, env, ray_cluster, sweep  # noqa: F401 - the same fixtures

pytestmark = pytest.mark.timeout(600)

GRID = [
    {"method": ["svd", "whiten-fd"], "ratio": [0.2, 0.4]},
    {"method": ["id"], "ratio": [0.4]},
    {"method": ["svd"], "ratio": [0.99]},  # fails: the tiny model cannot lose 99 %
]


@pytest.fixture(scope="module")
def grid_dir(ray_cluster, corpus, env):  # noqa: F811
    out = runner.run_sweep(sweep(corpus, env / "results", "grid", grid=GRID))
    return Path(out.directory)


@pytest.fixture(scope="module")
def optuna_dir(grid_dir, tmp_path_factory):
    """The grid's table as a multi-objective Optuna study would have written it (the rows of both
    kinds of sweep are the same but for allocation and group ratios; test_sweep_e2e runs a real one)."""
    df = pd.read_parquet(grid_dir / TRIALS_FILE)
    trials = df["method"] != "dense"
    df.loc[trials, "allocation"] = "optuna"
    df.loc[trials, "group_ratios"] = json.dumps({"q": 0.3, "k": 0.5, "v": 0.2, "o": 0.1, "gate": 0.4, "up": 0.4,
                                                 "down": 0.3})
    folder = tmp_path_factory.mktemp("optuna")
    df.to_parquet(folder / TRIALS_FILE)
    record = json.loads((grid_dir / "sweep.json").read_text())
    record["spec"]["optuna"] = {"trials": 5, "objective": ["metric", "size"]}
    (folder / "sweep.json").write_text(json.dumps(record))
    _study_of(df[trials & (df["status"] == "ok")], folder)
    return folder


def _study_of(rows: pd.DataFrame, folder: Path) -> None:
    """The study's journal: one finished trial per row (its group ratios, its metric and size)."""
    import optuna

    from sweeps.study import Journal

    study = optuna.create_study(study_name="optuna", storage=Journal(str(folder), "optuna").open(fresh=True).storage,
                                directions=["minimize", "minimize"])
    for i, row in enumerate(rows.itertuples()):
        ratios = {f"group_ratios/{k}": v + 0.05 * i for k, v in json.loads(row.group_ratios).items()}
        study.add_trial(optuna.trial.create_trial(
            params=ratios, distributions={k: optuna.distributions.FloatDistribution(0.0, 0.9) for k in ratios},
            values=[row.metric, row.size_mb]))


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def check_png(path: Path) -> tuple[int, int]:
    """A real PNG of a sensible size: decodes, at least 300 x 150 pixels and at most 2500 x 2500."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
        assert image.format == "PNG"
        assert 300 <= width <= 2500 and 150 <= height <= 2500, (path, image.size)
        # not a blank canvas
        assert len(set(image.convert("L").getdata())) > 8, path
    assert 5_000 < path.stat().st_size < 1_000_000, path
    return width, height


# -- loading ----------------------------------------------------------------------------------------


def test_load_results_has_proper_dtypes(grid_dir):
    df = sweeps.load_results(grid_dir)
    assert list(df.columns) == list(COLUMNS)
    for col in ("status", "method", "allocation", "metric_name"):
        assert isinstance(df[col].dtype, pd.CategoricalDtype), col
    assert set(df["method"].cat.categories) == {"dense", "svd", "whiten-fd", "id"}
    assert df["params_compressed"].dtype == "Int64" and df["metric"].dtype == "float64"
    assert df["trial_id"].dtype == "string"
    ok = df[(df["status"] == "ok") & (df["method"] != "dense")]
    assert len(ok) == 5 and (df["status"] == "error").sum() == 1
    for row in ok.itertuples():
        assert isinstance(row.rank_plan, dict) and row.rank_plan["method"] == row.method
        assert isinstance(row.options, dict) and isinstance(row.group_ratios, dict)
        # measured speed: both models, on the trial's device, fixed batch and length
        assert row.latency_device.startswith("cpu") and row.latency_batch == 2 and row.latency_seq_len == 32
        assert row.latency_ms_dense > 0 and row.latency_ms_compressed > 0
        assert row.latency_iqr_ms_dense >= 0 and row.latency_iqr_ms_compressed >= 0
        assert row.speedup == pytest.approx(row.latency_ms_dense / row.latency_ms_compressed)
        assert row.speedup_flops > 1 and len(row.shape) == 12
    dense = df[df["method"] == "dense"].iloc[0]
    assert dense["rank_plan"] == {} and dense["options"] == {}
    # typed() is idempotent
    pd.testing.assert_frame_equal(typed(df), df)


def test_id_plans_are_kept_neurons_per_block(grid_dir):
    df = load_results(grid_dir)
    row = df[df["method"] == "id"].iloc[0]
    blocks, layers, fraction, ranks = plan_grid(row["rank_plan"])
    assert blocks == [0, 1] and layers == ["mlp"]
    assert all(0 < k < 128 for k in ranks[:, 0])  # tiny llama: FFN width 128
    svd = df[(df["method"] == "svd") & (df["status"] == "ok")].iloc[0]
    blocks, layers, fraction, ranks = plan_grid(svd["rank_plan"])
    assert layers == ["q", "k", "v", "o", "gate", "up", "down"]  # the roles the plan records, in block order
    assert ((0 < fraction) & (fraction < 1)).all()


# -- Pareto fronts against brute force ----------------------------------------------------------------


def brute_force(df: pd.DataFrame, x: str, y: str, x_sign: float, y_sign: float) -> set:
    points = [(i, x_sign * float(a), y_sign * float(b)) for i, a, b in zip(df.index, df[x], df[y])
              if pd.notna(a) and pd.notna(b)]
    front = set()
    for i, a, b in points:
        if not any(c <= a and d <= b and (c < a or d < b) for _, c, d in points):
            front.add(i)
    return front


def test_pareto_front_of_the_real_table_matches_brute_force(grid_dir):
    df = load_results(grid_dir)
    for x, y, x_mode in (("size_mb", "metric", "min"), ("size_mb", "metric_compressed", "min"),
                         ("achieved_ratio", "metric", "max"), ("latency_ms_compressed", "metric", "min")):
        front = pareto(df, x, y, x_mode=x_mode)
        assert set(front.index) == brute_force(df, x, y, 1 if x_mode == "min" else -1, 1), (x, y)
        assert len(front) and front[x].is_monotonic_increasing
    # accuracy tables: higher is better by default
    acc = load_results(grid_dir).assign(metric_name="accuracy", metric=lambda d: 1 / d["metric"])
    assert set(pareto(acc, "size_mb", "metric").index) == brute_force(acc, "size_mb", "metric", 1, -1)


def test_pareto_front_matches_brute_force_on_random_tables_with_ties():
    rng = np.random.default_rng(0)
    for n, trial in itertools.product((1, 2, 5, 30), range(40)):
        df = pd.DataFrame({"a": rng.integers(0, 6, n).astype(float), "b": rng.integers(0, 6, n).astype(float)})
        df.loc[rng.random(n) < 0.1, "b"] = np.nan  # missing values take no part
        for x_mode, y_mode in itertools.product(("min", "max"), repeat=2):
            front = pareto(df, "a", "b", x_mode=x_mode, y_mode=y_mode)
            expected = brute_force(df, "a", "b", 1 if x_mode == "min" else -1, 1 if y_mode == "min" else -1)
            assert set(front.index) == expected, (df, x_mode, y_mode)


# -- the report -----------------------------------------------------------------------------------------


def report_images(report: Path) -> list[str]:
    text = report.read_text()
    return [line.split("](", 1)[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]


def test_report_regenerates_from_the_parquet_alone_without_ray(grid_dir, tmp_path):
    only = tmp_path / "only-table"
    only.mkdir()
    shutil.copy(grid_dir / TRIALS_FILE, only / TRIALS_FILE)  # no sweep.json, no Tune files
    out = tmp_path / "out"
    code = ("import sys; from sweeps.report import regenerate; "
            f"print(regenerate({str(only)!r}, {str(out)!r})); "
            "assert 'ray' not in sys.modules, 'the report imported Ray'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not (only / "report.md").exists()  # --out: nothing written next to the table
    images = report_images(out / "report.md")
    assert sorted(images) == sorted(p.name for p in out.glob("*.png"))
    assert {"metric_vs_ratio.png", "pareto.png", "ranks_svd.png", "ranks_whiten-fd.png", "ranks_id.png"} <= set(images)
    for name in images:
        check_png(out / name)


def test_report_command_sections_and_units(grid_dir, capsys):
    code, out, err = cli(capsys, "report", grid_dir)
    assert code == 0, err
    report = grid_dir / "report.md"
    assert f"report: {report}" in out
    text = report.read_text()
    for heading in ("# Sweep grid", "## Metric against ratio", "## Best trial per ratio", "## Best per method",
                    "## Pareto front (size vs metric)", "## Speed", "## Where the budget went", "## All trials",
                    "## Errors"):
        assert heading in text, heading
    assert "- model: tiny:llama" in text and "sweep hash:" in text  # header from sweep.json
    for unit in ("size (MB)", "params (M)", "target removed", "20.0 %", " ms ", "x |", "trial time (s)"):
        assert unit in text, unit
    for name in report_images(report):
        check_png(grid_dir / name)
    # the best trial per ratio is the one with the lowest perplexity at that ratio
    df = load_results(grid_dir)
    best = best_per_ratio(df)
    assert list(best["target_ratio"]) == [0.2, 0.4]
    for row in best.itertuples():
        same = df[(df["target_ratio"] == row.target_ratio) & (df["status"] == "ok")]
        assert row.metric == same["metric"].min()
        assert f"| {row.trial_id} |" in text.split("## Best per method")[0]


def test_report_says_where_low_rank_is_slower(grid_dir, tmp_path, capsys):
    df = pd.read_parquet(grid_dir / TRIALS_FILE)
    trials = (df["method"] != "dense") & (df["status"] == "ok")
    df.loc[trials, "latency_iqr_ms_dense"] = df.loc[trials, "latency_iqr_ms_compressed"] = 0.01 * df.loc[
        trials, "latency_ms_dense"]
    for speedups, expected in ((1.5, "No compressed model was slower than the dense one beyond the spread"),
                               (0.995, "No compressed model was slower than the dense one beyond the spread"),
                               (0.5, "**Slower than dense in 5 of 5 trials**")):
        df.loc[trials, "latency_ms_compressed"] = df.loc[trials, "latency_ms_dense"] / speedups
        df.loc[trials, "speedup"] = speedups
        folder = tmp_path / str(speedups)
        folder.mkdir()
        df.to_parquet(folder / TRIALS_FILE)
        assert cli(capsys, "report", folder)[0] == 0
        text = (folder / "report.md").read_text()
        assert expected in text
        if expected.startswith("**Slower"):
            assert "two thinner ones" in text and text.count("| yes |") == 5
        else:
            assert "| yes |" not in text


def test_optuna_report_has_optunas_own_plots_of_the_study(optuna_dir):
    path, figures = regenerate(str(optuna_dir))
    assert {"optuna_history.png", "optuna_importances.png", "optuna_pareto.png"} <= set(figures)
    text = Path(path).read_text()
    assert "## Optuna" in text and "objectives: metric and model size" in text
    assert "`optuna-dashboard optuna.log` opens it" in text
    for name in figures:
        check_png(optuna_dir / name)
    assert "5 finished Optuna trials" in text and "7 group ratios" in text


# -- comparing two experiments ----------------------------------------------------------------------------


def test_compare_two_experiments(grid_dir, tmp_path, capsys):
    a = pd.read_parquet(grid_dir / TRIALS_FILE)
    b = a.copy()
    ok = b.index[(b["status"] == "ok") & (b["method"] != "dense")]
    b.loc[ok, "metric"] = b.loc[ok, "metric"] * 1.1  # B is 10 % worse everywhere
    renamed, dropped = ok[0], ok[1]
    b.loc[renamed, "trial_id"] = "b-only-id"     # same settings, another id (e.g. another code version)
    b = b.drop(index=dropped)                     # a trial B did not run
    extra = b.loc[[ok[2]]].assign(trial_id="extra", target_ratio=0.6, ratio=0.6)
    b = pd.concat([b, extra])
    folder_b = tmp_path / "b"
    folder_b.mkdir()
    b.to_parquet(folder_b / TRIALS_FILE)

    table = compare(load_results(grid_dir), load_results(folder_b)).set_index("trial_a", drop=False)
    assert table.loc[a.loc[renamed, "trial_id"], "matched"] == "settings"
    assert table.loc[a.loc[renamed, "trial_id"], "trial_b"] == "b-only-id"
    assert table.loc[a.loc[dropped, "trial_id"], "matched"] == "only in A"
    assert (table["matched"] == "only in B").sum() == 1 and table.loc[""]["trial_b"] == "extra"
    for i in ok.drop([dropped]):
        row = table.loc[a.loc[i, "trial_id"]]
        assert row["diff"] == pytest.approx(0.1 * a.loc[i, "metric"])
        assert row["diff_pct"] == pytest.approx(10.0) and row["better"] == "A"  # perplexity: lower wins
    assert table.loc["dense", "better"] == "same" and table.loc["dense", "matched"] == "trial id"
    failed = a.loc[a["status"] == "error", "trial_id"].iloc[0]
    assert table.loc[failed, "status_a"] == "error" and table.loc[failed, "better"] == ""

    code, out, err = cli(capsys, "compare", grid_dir, folder_b)
    assert code == 0, err
    assert "B - A (% of A)" in out and "+10.00 %" in out and "only in B" in out and "better in A: 4" in out


# -- bad input: one message, exit 2, no traceback ------------------------------------------------------


def bad_tables(root: Path, grid_dir: Path) -> dict[str, tuple[Path, str]]:
    good = (grid_dir / TRIALS_FILE).read_bytes()
    cases = {"missing folder": (root / "nowhere", "does not exist"),
             "no results": (root / "empty", "holds no results"),
             "corrupt parquet": (root / "corrupt", "corrupt or only partly written"),
             "partial parquet": (root / "partial", "corrupt or only partly written"),
             "missing columns": (root / "columns", "lacks the column(s)"),
             "no rows": (root / "rows", "holds no rows")}
    for name, (folder, _) in cases.items():
        if name != "missing folder":
            folder.mkdir()
    (root / "corrupt" / TRIALS_FILE).write_bytes(b"not a parquet file at all")
    (root / "partial" / TRIALS_FILE).write_bytes(good[: len(good) // 2])
    pd.read_parquet(grid_dir / TRIALS_FILE).drop(columns=["metric", "rank_plan"]).to_parquet(
        root / "columns" / TRIALS_FILE)
    pd.read_parquet(grid_dir / TRIALS_FILE).iloc[:0].to_parquet(root / "rows" / TRIALS_FILE)
    return cases


def test_bad_input_exits_2_with_one_message(grid_dir, tmp_path, capsys):
    for name, (folder, message) in bad_tables(tmp_path, grid_dir).items():
        for argv in (("report", folder), ("compare", grid_dir, folder), ("compare", folder, grid_dir),
                     ("export", folder, "--best", "--out", tmp_path / "x")):
            code, out, err = cli(capsys, *argv)
            assert code == 2, (name, argv, err)
            assert err.startswith("lrsweep: error: ") and message in err, (name, err)
            assert "Traceback" not in err and err.count("\n") == 1, err
    with pytest.raises(UserInputError, match="no column 'nope'"):
        pareto(load_results(grid_dir), "nope", "metric")
    with pytest.raises(UserInputError, match="at least 0.5"):
        best_trial(load_results(grid_dir), min_ratio=0.5)
