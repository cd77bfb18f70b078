"""Export one trial's compressed model as a folder (compact or dense layout), and run an exported model.

Nothing but the rank plan and (when kept) the finetuned weights is stored per trial: the model is
rebuilt the way the trial built it. The dense model comes from the sweep's model source (for
classification, with the task-finetuned weights of the calibration cache), its decompositions from
the cached calibration statistics named by the row's `calibration_key`, the compressed layers from
the stored rank plan (`compression.compress`), refitted as the trial did when it had a refit stage
(on the sweep's calibration batches, drawn again); then, for a finetuned trial, the parameters its
checkpoint holds replace the rebuilt ones: those of its best evaluation (LoRA adapters merged into
the weights they adapt), also for a trial stopped early. The result goes through
`compression.save_compressed` (layout "compact": the factors, for `load_compressed`) or
`compression.save_dense` (layout "dense": multiplied back, for plain transformers and any
harness), with a model card (`sweeps.model_card`).

Statistics missing from the cache are computed again from the stored sweep (as `lrsweep calibrate`
would, without evaluating the dense model) when the sweep's settings still give the same key.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
import logging
from pathlib import Path

import pandas as pd
import torch

from compression.errors import UserInputError
from sweeps.analysis import best_trial, find_trial
from sweeps.report import read_record
from sweeps.table import load_results

log = logging.getLogger("lrsweep")


@dataclass
class Rebuilt:
    """A trial's model, rebuilt: what `export` saves."""

    model: torch.nn.Module
    tokenizer: object
    row: pd.Series
    plan: object | None          # compression.allocation.RankPlan (None for the dense baseline)
    finetuned: bool              # the trial's finetuned weights were loaded
    label_names: list[str] | None
    source: str = ""             # the sweep's model source

    @property
    def metric(self) -> float:
        """The metric the trial recorded for exactly this model."""
        return float(self.row["metric"] if self.finetuned or self.row["method"] == "dense"
                     else self.row["metric_compressed"])


def choose(df: pd.DataFrame, trial: str | None = None, best: bool = False, max_ratio: float | None = None,
           min_ratio: float | None = None) -> pd.Series:
    """The row of trial id `trial`, or the best one (`best`, optionally with a ratio bound)."""
    if (trial is None) == (not best):
        raise UserInputError("name one trial: a trial id, or the best trial (optionally with a max or min ratio)")
    if trial is not None and (max_ratio is not None or min_ratio is not None):
        raise UserInputError("a max or min ratio chooses among trials for the best one; a trial id names one")
    for what, value in (("max ratio", max_ratio), ("min ratio", min_ratio)):
        if value is not None and not 0 <= value < 1:
            raise UserInputError(f"{what} {value:g} is outside [0, 1): it is the fraction of the targeted "
                                 f"parameters removed, e.g. 0.4")
    return find_trial(df, trial) if trial is not None else best_trial(df, max_ratio=max_ratio, min_ratio=min_ratio)


def _spec(directory: str):
    from sweeps.spec import parse_spec

    record = read_record(directory)
    if record is None or not isinstance(record.get("spec"), dict):
        raise UserInputError(f"{directory} has no readable sweep.json (the stored sweep): without it the "
                             f"trial's model cannot be rebuilt")
    return parse_spec(record["spec"], origin=f"{directory}/sweep.json")


def _statistics(spec, key: str):
    """(statistics, task-finetuned dense weights or None, the loaded dense model or None) of
    calibration key `key`: from the cache, else computed again when the sweep's settings still give
    `key` (which loads the model, returned so it is not loaded twice)."""
    from sweeps.prepare import (cached_dense_weights, cached_stats, calibration_cache, calibration_key,
                                calibration_keys, stats_for)

    folder = calibration_cache()
    stats = cached_stats(key)
    dense = cached_dense_weights(key) if spec.task.type == "classification" else None
    if stats is not None and (dense is not None or spec.task.type != "classification"):
        return stats, dense, None
    if key not in calibration_keys(spec):
        raise UserInputError(
            f"the calibration statistics {key} of this trial are not in the cache ({folder}), and the "
            f"sweep's model or data changed since (its settings now give key {calibration_key(spec)}), so "
            f"they cannot be computed again; set LRSWEEP_CACHE to the cache the sweep used")
    log.info(f"calibration statistics {key} are not in the cache: computing them again from the stored sweep")
    prepared = stats_for(spec)
    return prepared.stats, prepared.dense_state, prepared.loaded


def _finetuned_weights(directory: str, row: pd.Series) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    from sweeps.storage import read_file
    from trainables.trial import CHECKPOINT_WEIGHTS

    folder = str(row["checkpoint"])
    data = read_file(directory, f"{folder}/{CHECKPOINT_WEIGHTS}")
    if data is None:
        raise UserInputError(f"the finetuned weights of trial {row['trial_id']} ({folder}/{CHECKPOINT_WEIGHTS}) "
                             f"are missing from {directory}; export the model as compressed, before finetuning "
                             f"(before_finetune; --before-finetune on the command line)")
    try:
        return load(data)
    except SafetensorError as e:
        raise UserInputError(f"the finetuned weights of trial {row['trial_id']} ({folder}/{CHECKPOINT_WEIGHTS}) "
                             f"are damaged ({e}); export the model as compressed, before finetuning "
                             f"(before_finetune; --before-finetune on the command line)") from None


def rebuild(directory: str, row: pd.Series, before_finetune: bool = False, device: str = "cpu") -> Rebuilt:
    """The model of trial `row` of the sweep folder `directory` (see the module docstring)."""
    from compression.allocation import RankPlan
    from compression.apply import compress, decompose_model
    from compression.methods import method_config
    from compression.refit import refit, row_scales
    from sweeps.prepare import redraw_calibration
    from trainables.sources import load_labelled, load_model

    directory = str(directory)
    spec = _spec(directory)
    trial = row["trial_id"]
    steps = 0 if pd.isna(row["finetune_steps"]) else int(row["finetune_steps"])
    stopped = row["status"] == "stopped"
    wants_finetuned = row["method"] != "dense" and not before_finetune and (steps > 0 or stopped)
    if wants_finetuned and stopped and not str(row["checkpoint"]):
        raise UserInputError(f"trial {trial} was stopped early (ASHA or a time limit) and kept no finetuned "
                             f"weights (it had not evaluated a finetuned model yet, or checkpoints.keep dropped "
                             f"them); export it as compressed, before finetuning (before_finetune; "
                             f"--before-finetune on the command line)")
    if wants_finetuned and not str(row["checkpoint"]):
        name = row["metric_name"]
        raise UserInputError(
            f"trial {trial} was finetuned ({steps} steps) but its finetuned weights were not kept: a sweep keeps "
            f"them for the best {spec.checkpoints.keep} trial(s) of each ratio (checkpoints.keep in the sweep "
            f"file). Export it as compressed, before finetuning (before_finetune; --before-finetune on the command "
            f"line: {name} {row['metric_compressed']:.4g} instead of {row['metric']:.4g}), or the best trial")

    task = spec.task.type
    label_names = None
    if task == "classification":
        settings = spec.task_settings()
        label_names = load_labelled(settings["train"], seed=spec.seed, text_column=settings["text_column"],
                                    label_column=settings["label_column"]).label_names
    stats, dense_state, loaded = _statistics(spec, str(row["calibration_key"])) if row["calibration_key"] \
        else (None, None, None)
    if loaded is None:
        loaded = load_model(spec.model, task=task, num_labels=len(label_names) if label_names else None,
                            seed=spec.seed)
    model = loaded.model
    if dense_state is not None:
        model.load_state_dict(dense_state)
    if label_names:
        model.config.id2label = dict(enumerate(label_names))
        model.config.label2id = {name: i for i, name in enumerate(label_names)}

    plan, finetuned = None, False
    if row["method"] != "dense":
        if stats is None:
            raise UserInputError(f"trial {trial} names no calibration statistics (calibration_key is empty)")
        method = method_config(str(row["method"]), **row["options"])
        plan = RankPlan.from_dict(row["rank_plan"])
        stats.check_matches(model)
        decompositions = decompose_model(model, stats, method, device=device if device != "cpu" else None)
        dense = copy.deepcopy(model) if row["refit"] else None
        compress(model, stats, method, plan, decompositions)
        if dense is not None:  # the trial's refit stage, on the same calibration batches
            refit(model, dense, redraw_calibration(spec, loaded.tokenizer), stats.targets, row_scales(decompositions),
                  dense_layers=row["refit"]["dense"], damp=row["refit"]["damp"])
            del dense
        del decompositions
        if wants_finetuned:  # the best evaluated weights (LoRA adapters merged into them)
            trained = _finetuned_weights(directory, row)
            params = dict(model.named_parameters())
            bad = [k for k, v in trained.items() if k not in params or params[k].shape != v.shape]
            if bad:
                raise UserInputError(f"the finetuned weights of trial {trial} do not fit the rebuilt model "
                                     f"({', '.join(bad[:5])}): was the sweep's model changed since?")
            with torch.no_grad():
                for k, v in trained.items():
                    params[k].copy_(v)
            finetuned = True
    model.eval()
    return Rebuilt(model=model, tokenizer=loaded.tokenizer, row=row, plan=plan, finetuned=finetuned,
                   label_names=label_names, source=spec.model)


FORMATS = ("compact", "dense")


def export_trial(directory: str, out: str | Path, trial: str | None = None, best: bool = False,
                 max_ratio: float | None = None, min_ratio: float | None = None, before_finetune: bool = False,
                 device: str = "cpu", format: str = "compact", dtype: str | None = None,
                 max_shard_size: int | str | None = None) -> tuple[Path, Rebuilt]:
    """`lrsweep export`: choose a trial, rebuild its model, write it in layout `format` ("compact":
    the factors, `save_compressed`; "dense": multiplied back, `save_dense`) in `dtype` (float32,
    bfloat16 or float16; default the model's), in safetensors shards of at most `max_shard_size`
    ("2GB"), with a model card. lowrank.json's "extra" holds the trial's whole row (`TrialRow`),
    the sweep folder, whether the finetuned weights were loaded, and the metric of exactly this model."""
    from compression.densify import reference_model
    from compression.io import check_dtype, check_output_folder, check_shard_size, save_compressed, save_dense
    from sweeps.model_card import model_card
    from sweeps.storage import check_location
    from sweeps.table import row_of
    from trainables.sources import license_of

    if format not in FORMATS:
        raise UserInputError(f"format {format!r} is not an export layout; allowed: {', '.join(FORMATS)}")
    check_dtype(dtype), check_shard_size(max_shard_size)  # before the (long) rebuild
    directory = str(directory)
    check_device(device)
    check_location(str(check_output_folder(out)), "--out")  # before the model is rebuilt
    df = load_results(directory)
    row = choose(df, trial=trial, best=best, max_ratio=max_ratio, min_ratio=min_ratio)
    built = rebuild(directory, row, before_finetune=before_finetune, device=device)
    model = built.model.to("cpu")
    extra = row_of(row).to_dict() | {"sweep": directory, "finetuned": built.finetuned, "metric": built.metric}
    compressed = sum(p.numel() for p in model.parameters())
    stored = compressed if format == "compact" else sum(p.numel() for p in reference_model(model).parameters())
    card = model_card(row, format, built.source, license_of(built.source), str(out), type(model).__name__,
                      parameters=stored, compressed_parameters=compressed, finetuned=built.finetuned)
    save = save_compressed if format == "compact" else save_dense
    path = save(model, out, tokenizer=built.tokenizer, plan=built.plan, extra=extra, dtype=dtype,
                max_shard_size=max_shard_size, card=card)
    return path, built


def describe(built: Rebuilt) -> str:
    row = built.row
    name = str(row["metric_name"])
    value = f"{100 * built.metric:.2f} %" if name == "accuracy" else f"{built.metric:.4g}"
    params = sum(p.numel() for p in built.model.parameters())
    if row["method"] == "dense":
        what = "the dense baseline"
    else:
        stage = "after finetuning" if built.finetuned else "as compressed, before finetuning"
        what = (f"trial {row['trial_id']} ({row['method']} / {row['allocation']}, "
                f"{100 * row['target_ratio']:.0f} % of the targeted parameters removed; {stage})")
    return f"{what}: {name} {value} in the sweep, {params / 1e6:.2f} M parameters"


# -- running an exported model --------------------------------------------------------------------


def check_device(device: str) -> str:
    """`device` when this machine has it (cpu, cuda, cuda:N, mps); UserInputError naming what it has."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserInputError(f"--device {device!r} is not a device ({e}); allowed: cpu, cuda, cuda:N, mps") from None
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise UserInputError(f"--device {device!r}: allowed: cpu, cuda, cuda:N, mps")
    if parsed.type == "cuda" and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA"
        raise UserInputError(f"--device {device!r}: this machine has {found}; use --device cpu")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UserInputError(f"--device {device!r}: this machine has no MPS device; use --device cpu")
    return device


def _is_classifier(model) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    return type(model).__name__ in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values()


def _load(path: str | Path, kind: str, device: str):
    """An exported model that can do `kind` ("causal": generate text; "classifier": label it),
    decided by what the model can do, not by its class name."""
    from compression.io import load_compressed

    check_device(device)
    model, tokenizer, info = load_compressed(path, device=device)
    generates, classifies = model.can_generate(), _is_classifier(model)
    holds = f"{path} holds a {info.get('architecture') or type(model).__name__}"
    if kind == "causal" and not generates:
        raise UserInputError(f"{holds}, not a causal language model (it cannot generate text)"
                             + ("; use `lrsweep classify`" if classifies else ""))
    if kind == "classifier" and not classifies:
        raise UserInputError(f"{holds}, not a sequence classifier" + ("; use `lrsweep generate`" if generates else ""))
    if tokenizer is None:
        raise UserInputError(f"{path} has no tokenizer files; export it with `lrsweep export` (which saves them)")
    return model, tokenizer


def generate(path: str | Path, prompt: str, max_new_tokens: int = 32, device: str = "cpu") -> str:
    """Greedy continuation of `prompt` by the causal LM saved in `path` (the new text only)."""
    if not prompt:
        raise UserInputError("the prompt is empty; give some text to continue")
    if max_new_tokens < 1:
        raise UserInputError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    model, tokenizer = _load(path, "causal", device)
    encoded = tokenizer(prompt, return_tensors="pt").to(device)
    with torch.inference_mode():
        out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


def classify(path: str | Path, text: str, device: str = "cpu") -> list[tuple[str, float]]:
    """(label, probability) of `text` under the classifier saved in `path`, most probable first."""
    if not text:
        raise UserInputError("the text is empty; give some text to classify")
    model, tokenizer = _load(path, "classifier", device)
    limit = getattr(model.config, "max_position_embeddings", None) or 512
    encoded = tokenizer(text, return_tensors="pt", truncation=True, max_length=limit).to(device)
    with torch.inference_mode():
        probs = torch.softmax(model(**encoded).logits[0].float(), dim=-1)
    names = model.config.id2label or {}
    out = [(str(names.get(i, f"LABEL_{i}")), float(p)) for i, p in enumerate(probs)]
    return sorted(out, key=lambda x: -x[1])
