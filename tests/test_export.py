"""Export of a real sweep's trials (tiny llama and tiny bert): checkpoints kept for the best trial of
each ratio, the exported model reloads to the logits and metric the trial measured (compact and
dense layouts), generate and classify run on exports, and bad choices exit 2. The same causal sweep
has a `final_eval` stage (its numbers are those of the exports) and MLflow tracking (one run per
trial in a local file store)."""

import json
import random
from pathlib import Path

import pandas as pd
import pytest
import torch

import sweeps.runner as runner
from sweeps import prepare
from compression.errors import UserInputError
from compression.io import load_compressed
from sweeps.analysis import best_per_ratio
from sweeps.cli import main
from sweeps.export import export_trial, rebuild
from sweeps.spec import parse_spec
from sweeps.table import load_results
from test_sweep_e2e import corpus, env, ray_cluster, sweep  # noqa: F401 - the same fixtures
from trainables.evaluation import evaluate, logits_of
from trainables.trial import CHECKPOINT_WEIGHTS

pytestmark = pytest.mark.timeout(900)

GRID = [
    {"method": ["whiten-fd"], "ratio": [0.2, 0.4]},
    {"method": ["svd"], "ratio": [0.4]},
    {"method": ["svd"], "ratio": [0.99]},  # fails
    # healed by LoRA adapters on the factors, distilled from the dense model (the best of its ratio)
    {"method": ["whiten-fd"], "ratio": [0.3], "finetune": {"kind": ["lora"], "loss": ["distill"]}},
]
FINETUNE = {"steps": 2, "batch_size": 2, "lr": 1e-3, "train": "compressed"}


def final_eval(corpus):
    return {"tasks": ["lrsweep_lee_cloze"], "limit": 3, "perplexity": f"path:{corpus}", "seq_len": 64,
            "max_windows": 3}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Rebuild with one thread, as the trials ran (and small LAPACK calls with two threads crawl on a
    busy two-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def causal(ray_cluster, corpus, env):  # noqa: F811
    spec = sweep(corpus, env / "results", "causal", grid=GRID, finetune=FINETUNE, final_eval=final_eval(corpus),
                 tracking={"mlflow": {"tags": {"team": "compression"}}})
    out = runner.run_sweep(spec)
    return spec, Path(out.directory)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    rng = random.Random(0)
    good, bad = "great fine happy good nice".split(), "awful sad poor bad grim".split()
    rows = [{"text": " ".join(rng.choice(good if y else bad) for _ in range(8)) + f" {i}", "label": ["neg", "pos"][y]}
            for i, y in enumerate(rng.choice([0, 1]) for _ in range(80))]
    path = tmp_path_factory.mktemp("labelled") / "reviews.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def classifier(causal, labelled, env):  # noqa: F811 - after the causal sweep (one Ray session)
    spec = parse_spec({
        "name": "classifier", "model": "tiny:bert",
        "task": {"type": "classification", "train": f"path:{labelled}", "max_length": 32, "eval_batch_size": 8,
                 "dense_finetune": {"steps": 2, "batch_size": 8, "lr": 1e-3}},
        "calibration": {"samples": 8, "batch_size": 4},
        "grid": {"method": ["whiten"], "ratio": [0.3]},
        "resources": {"cpu": 1}, "storage": str(env / "results"),
    })
    out = runner.run_sweep(spec)
    return spec, Path(out.directory)


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def eval_windows(spec, tokenizer) -> torch.Tensor:
    return prepare.draw_text(spec, tokenizer)["eval"]  # the windows the trials were evaluated on


def perplexity(model, spec, tokenizer) -> float:
    return evaluate(model, "causal-lm", eval_windows(spec, tokenizer), batch_size=8).value


# -- checkpoints ----------------------------------------------------------------------------------------


def test_only_the_best_trial_of_each_ratio_keeps_its_finetuned_weights(causal):
    _, folder = causal
    df = load_results(folder)
    ok = df[(df["status"] == "ok") & (df["method"] != "dense")]
    assert len(ok) == 4
    kept = ok[ok["checkpoint"] != ""]
    assert set(kept["trial_id"]) == set(best_per_ratio(df)["trial_id"]) and len(kept) == 3
    for row in kept.itertuples():
        weights = folder / row.checkpoint / CHECKPOINT_WEIGHTS
        assert weights.is_file()
        from safetensors.torch import load_file

        names = set(load_file(weights))
        # train: compressed -> exactly the parameters of the factorised layers
        assert names and all(".self_attn." in n or ".mlp." in n for n in names)
        assert all(n.endswith((".A", ".B")) or "weight" in n or "bias" in n for n in names)
    # the others' folders are gone: as many checkpoint folders on disk as kept rows
    assert len(list(folder.glob("trial_*/checkpoint_*"))) == len(kept)


# -- export ----------------------------------------------------------------------------------------------


def test_export_best_reloads_to_the_logits_and_metric_of_the_trial(causal, tmp_path, capsys):
    spec, folder = causal
    out = tmp_path / "best"
    code, stdout, err = cli(capsys, "export", folder, "--best", "--out", out)
    assert code == 0, err
    df = load_results(folder)
    best = df.loc[df[(df["status"] == "ok") & (df["method"] != "dense")]["metric"].idxmin()]
    assert f"trial {best['trial_id']}" in stdout and "after finetuning" in stdout

    model, tokenizer, info = load_compressed(out)
    assert info["extra"]["trial_id"] == best["trial_id"] and info["extra"]["finetuned"] is True
    assert info["plan"]["ranks"] == best["rank_plan"]["ranks"]
    assert sum(p.numel() for p in model.parameters()) == best["params_compressed"]
    # the saved folder gives exactly the logits of the model the export rebuilt ...
    built = rebuild(str(folder), best)
    ids = eval_windows(spec, tokenizer)
    with torch.inference_mode():
        assert torch.equal(logits_of(model(input_ids=ids)), logits_of(built.model(input_ids=ids)))
    # ... which is the model the trial evaluated: the same perplexity on the same windows, to the bit
    assert perplexity(model, spec, tokenizer) == best["metric"]
    assert best["metric"] != pytest.approx(best["metric_compressed"], rel=1e-3)  # finetuning changed it


def test_dense_and_compact_exports_with_their_model_cards(causal, tmp_path, capsys):
    """--format dense: plain transformers loads it, with the logits of the compact export; both
    carry a model card naming the trial; dtype and shard options reach the files."""
    import transformers

    _, folder = causal
    df = load_results(folder)
    best = df.loc[df[(df["status"] == "ok") & (df["method"] != "dense")]["metric"].idxmin()]
    code, out, err = cli(capsys, "export", folder, "--best", "--format", "dense", "--out", tmp_path / "dense",
                         "--max-shard-size", "100KB")
    assert code == 0, err
    assert "plain transformers loads it" in out and "no size gain" in out
    assert (tmp_path / "dense" / "model.safetensors.index.json").is_file()
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert sum(p.numel() for p in plain.parameters()) == best["params_dense"]
    assert cli(capsys, "export", folder, "--best", "--out", tmp_path / "compact")[0] == 0
    compact, tokenizer, info = load_compressed(tmp_path / "compact")
    ids = tokenizer(["the model layer rank", "low compress"], return_tensors="pt", padding=True)["input_ids"]
    with torch.inference_mode():
        assert (logits_of(plain(input_ids=ids)) - logits_of(compact(input_ids=ids))).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="load_compressed"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "compact")
    for layout in ("dense", "compact"):
        card = (tmp_path / layout / "README.md").read_text()
        assert best["trial_id"] in card and "tiny:llama" in card and f"**{layout}** layout" in card
        assert "licence of the source model: none (randomly initialised weights)" in card
        assert f"{100 * best['achieved_ratio']:.2f} % removed" in card and "| q |" in card

    assert cli(capsys, "export", folder, "--best", "--dtype", "bfloat16", "--out", tmp_path / "half")[0] == 0
    assert load_compressed(tmp_path / "half")[0].dtype == torch.bfloat16
    code, _, err = cli(capsys, "export", folder, "--best", "--max-shard-size", "9XB", "--out", tmp_path / "bad")
    assert code == 2 and "max shard size" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_a_trial_whose_weights_were_not_kept_exports_before_finetuning(causal, tmp_path, capsys, monkeypatch):
    spec, folder = causal
    df = load_results(folder)
    row = df[(df["status"] == "ok") & (df["method"] != "dense") & (df["checkpoint"] == "")].iloc[0]
    code, _, err = cli(capsys, "export", folder, "--trial", row["trial_id"], "--out", tmp_path / "x")
    assert code == 2 and "were not kept" in err and "--before-finetune" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()

    code, stdout, err = cli(capsys, "export", folder, "--trial", row["trial_id"][:6], "--before-finetune",
                            "--out", tmp_path / "compressed")
    assert code == 0, err
    assert "before finetuning" in stdout
    model, tokenizer, info = load_compressed(tmp_path / "compressed")
    assert info["extra"]["finetuned"] is False and info["extra"]["metric"] == row["metric_compressed"]
    assert perplexity(model, spec, tokenizer) == row["metric_compressed"]  # rebuilt from statistics and plan

    # statistics gone from the cache: computed again from the stored sweep, same model
    monkeypatch.setenv("LRSWEEP_CACHE", str(tmp_path / "empty-cache"))
    path, built = export_trial(str(folder), tmp_path / "recomputed", trial=row["trial_id"], before_finetune=True)
    assert (tmp_path / "empty-cache" / "calibration" / f"{row['calibration_key']}.safetensors").is_file()
    again, _, _ = load_compressed(path)
    ids = eval_windows(spec, tokenizer)
    with torch.inference_mode():
        torch.testing.assert_close(logits_of(again(input_ids=ids)), logits_of(model(input_ids=ids)),
                                   rtol=1e-4, atol=1e-4)


def test_a_lora_trial_exports_its_merged_weights(causal, tmp_path, capsys):
    spec, folder = causal
    df = load_results(folder)
    row = df[df["finetune"].map(lambda f: f.get("kind") == "lora")].iloc[0]
    assert row["status"] == "ok" and row["checkpoint"] and 0 < row["params_trained"] < row["params_compressed"] / 3
    from safetensors.torch import load_file

    names = set(load_file(folder / row["checkpoint"] / CHECKPOINT_WEIGHTS))
    assert names and all(n.endswith((".first.weight", ".second.weight")) for n in names)  # LoRA merged
    code, stdout, err = cli(capsys, "export", folder, "--trial", row["trial_id"], "--out", tmp_path / "lora")
    assert code == 0, err
    model, tokenizer, info = load_compressed(tmp_path / "lora")
    assert info["extra"]["finetuned"] is True
    assert not any("lora" in n for n, _ in model.named_parameters())
    # the trial evaluated the adapters unmerged: the merged model gives its perplexity to rounding
    assert perplexity(model, spec, tokenizer) == pytest.approx(row["metric"], rel=1e-5)
    assert row["metric"] != pytest.approx(row["metric_compressed"], rel=1e-3)

    # stopped early (ASHA, a time limit): its checkpoint holds its best evaluated weights, and export uses them
    stopped = row.copy()
    stopped["status"] = "stopped"
    assert rebuild(str(folder), stopped).finetuned
    stopped["checkpoint"] = ""
    with pytest.raises(UserInputError, match="stopped early.*--before-finetune"):
        rebuild(str(folder), stopped)


def test_best_under_a_ratio_bound(causal, tmp_path, capsys):
    _, folder = causal
    df = load_results(folder)
    best = best_per_ratio(df).set_index("target_ratio")["trial_id"]
    code, _, err = cli(capsys, "export", folder, "--best", "--max-ratio", 0.25, "--out", tmp_path / "small")
    assert code == 0, err
    assert json.loads((tmp_path / "small" / "lowrank.json").read_text())["extra"]["trial_id"] == best[0.2]
    code, _, err = cli(capsys, "export", folder, "--best", "--min-ratio", 0.35, "--out", tmp_path / "large")
    assert code == 0, err
    assert json.loads((tmp_path / "large" / "lowrank.json").read_text())["extra"]["trial_id"] == best[0.4]


def test_bad_choices_exit_2_with_one_message(causal, tmp_path, capsys):
    _, folder = causal
    df = load_results(folder)
    failed = df.loc[df["status"] == "error", "trial_id"].iloc[0]
    cases = {
        "unknown trial": (("--trial", "nosuchtrial"), "no trial 'nosuchtrial'"),
        "failed trial": (("--trial", failed), "failed, so there is no model"),
        "nothing under the ratio": (("--best", "--min-ratio", 0.5), "at least 0.5"),
        "ratio out of range": (("--best", "--max-ratio", 1.5), "outside [0, 1)"),
        "ratio without --best": (("--trial", failed, "--max-ratio", 0.3), "with --best"),
    }
    for name, (argv, message) in cases.items():
        code, _, err = cli(capsys, "export", folder, *argv, "--out", tmp_path / "x")
        assert code == 2, (name, err)
        assert err.startswith("lrsweep: error: ") and message in err and "Traceback" not in err, (name, err)
    assert not (tmp_path / "x").exists()


# -- running exports -------------------------------------------------------------------------------------


def test_generate_and_classify_run_the_exports(causal, classifier, tmp_path, capsys):
    _, folder = causal
    assert cli(capsys, "export", folder, "--best", "--out", tmp_path / "lm")[0] == 0
    code, out, err = cli(capsys, "generate", tmp_path / "lm", "the model", "--max-new-tokens", 8)
    assert code == 0, err
    assert out.startswith("the model") and len(out.strip()) > len("the model")

    cls_spec, cls_folder = classifier
    df = load_results(cls_folder)
    row = df[df["method"] == "whiten"].iloc[0]
    assert row["status"] == "ok" and row["metric_name"] == "accuracy" and row["checkpoint"] == ""
    code, out, err = cli(capsys, "export", cls_folder, "--best", "--out", tmp_path / "cls")
    assert code == 0, err
    model, tokenizer, info = load_compressed(tmp_path / "cls")
    assert info["architecture"] == "BertForSequenceClassification" and info["method"] == "whiten"
    data = prepare.labelled(cls_spec)
    accuracy = evaluate(model, "classification", data["eval"], tokenizer=tokenizer, max_length=32).value
    assert accuracy == row["metric"]
    code, out, err = cli(capsys, "classify", tmp_path / "cls", "great happy nice good")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert sorted(line.split()[0] for line in lines) == ["neg", "pos"]
    assert sum(float(line.split()[1]) for line in lines) == pytest.approx(100, abs=0.02)

    for argv, message in ((("generate", tmp_path / "cls", "hello"), "use `lrsweep classify`"),
                          (("classify", tmp_path / "lm", "hello"), "use `lrsweep generate`"),
                          (("generate", tmp_path / "nothing", "hello"), "does not exist"),
                          (("generate", tmp_path / "lm", ""), "prompt is empty")):
        code, _, err = cli(capsys, *argv)
        assert code == 2 and message in err and "Traceback" not in err, err


# -- the final_eval stage and tracking of the same sweep -------------------------------------------------


def test_final_eval_numbers_of_the_dense_model_and_the_best_of_each_ratio(causal, corpus, tmp_path):  # noqa: F811
    from sweeps.evaluation import EvalSettings, measure
    from trainables.harness import context_perplexity
    from trainables.sources import load_model

    spec, folder = causal
    df = load_results(folder)
    columns = ["lrsweep_lee_cloze/acc", "lrsweep_lee_cloze/acc_stderr", "lrsweep_lee_cloze/acc_norm",
               "context_ppl/perplexity", "seconds/lm_eval", "seconds/context_ppl"]
    assert all(c in df.columns for c in columns)
    evaluated = df[df["context_ppl/perplexity"].notna()]
    best = best_per_ratio(df)
    assert set(evaluated["trial_id"]) == {"dense", *best["trial_id"]} and len(evaluated) == 4  # 3 ratios
    assert evaluated[columns].notna().all().all() and evaluated["lrsweep_lee_cloze/acc"].between(0, 1).all()

    # the dense number is that of the dense model, measured directly ...
    dense = load_model("tiny:llama", seed=spec.seed)
    expected = context_perplexity(dense.model, dense.tokenizer, f"path:{corpus}", seq_len=64, max_windows=3,
                                  seed=spec.seed)
    assert df.set_index("trial_id").loc["dense", "context_ppl/perplexity"] == pytest.approx(expected.value, rel=1e-6)
    # ... and a trial's numbers are those of its export (the finetuned model the trial evaluated)
    row = best.iloc[-1]
    path, _ = export_trial(str(folder), tmp_path / "exported", trial=row["trial_id"])
    model, tokenizer, _ = load_compressed(path)
    settings = EvalSettings(tasks=("lrsweep_lee_cloze",), limit=3, perplexity=f"path:{corpus}", seq_len=64,
                            max_windows=3, seed=spec.seed)
    for key, value in measure(model, tokenizer, settings).metrics.items():
        assert row[key] == pytest.approx(value, rel=1e-5), key
    assert "lrsweep_lee_cloze/acc" in (path / "README.md").read_text()  # the model card quotes them

    report = (folder / "report.md").read_text()
    section = report.split("## Standard evaluation (final_eval)")[1].split("\n## ")[0]
    assert all(t in section for t in evaluated["trial_id"]) and "lrsweep_lee_cloze/acc" in section


def test_final_eval_keeps_numbers_until_its_settings_change(causal, monkeypatch):
    """What a resumed sweep does with the stored table: nothing for the same settings."""
    import sweeps.evaluation
    from sweeps.final_eval import run_final_eval
    from sweeps.table import ResultsTable, read_trials, rows_of, typed

    spec, folder = causal
    calls = []
    original = sweeps.evaluation.measure
    monkeypatch.setattr(sweeps.evaluation, "measure", lambda *a, **k: calls.append(k["name"]) or original(*a, **k))
    table = ResultsTable(str(folder), rows_of(read_trials(str(folder))))
    assert run_final_eval(spec, str(folder), table) == 0 and calls == []
    fewer = spec.model_copy(update={"final_eval": spec.final_eval.model_copy(update={"limit": 2})})
    assert run_final_eval(fewer, str(folder), table) == 4 and calls[0] == "the dense model"
    assert all(cell["settings"]["limit"] == 2 for cell in typed(table.frame())["final_eval"] if cell)


def test_one_mlflow_run_per_trial_in_the_sweep_folder(causal):
    import mlflow

    spec, folder = causal
    client = mlflow.MlflowClient(tracking_uri=(folder / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name(spec.name).experiment_id])
    df = load_results(folder)
    assert len(runs) == len(df[df["method"] != "dense"]) == 5
    assert all(r.data.tags["team"] == "compression" and r.data.params["trial/method"] in ("svd", "whiten-fd")
               for r in runs)
    ok = df[(df["status"] == "ok") & (df["method"] != "dense")]
    logged = [r.data.metrics for r in runs if r.data.metrics.get("metric", float("nan")) > 0]  # the failed one: NaN
    assert sorted(m["metric"] for m in logged) == pytest.approx(sorted(ok["metric"]))
    assert sorted(m["size_mb"] for m in logged) == pytest.approx(sorted(ok["size_mb"]))
