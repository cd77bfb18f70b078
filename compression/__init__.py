"""compression: low-rank and neuron-pruning compression of transformer LMs (pure PyTorch).

    from compression import collect_stats, decompose_model, plan_ranks, compress, save_compressed

    stats = collect_stats(model, batches)                    # once per model and calibration data
    decs = decompose_model(model, stats, "whiten-fd")        # once per method (or a config: WhitenFd(alpha=0.5))
    plan = plan_ranks(model, stats, "whiten-fd", 0.4, "uniform", decs)   # per ratio / allocation
    compress(model, stats, "whiten-fd", plan, decs)          # in place; inplace=False copies
    save_compressed(model, "out/", tokenizer, plan)          # load_compressed("out/") -> model, tokenizer, info
    save_dense(model, "dense/", tokenizer, plan)             # densify + save_pretrained: plain transformers loads it

Layout: `targets` (all architecture knowledge: blocks, roles, weight layouts), `methods` (one
module per method, registered configs), `allocation` (rank plans for a budget), `calibration`
(statistics), `layers` (the compressed layer types and the swaps), `apply` (the verbs above),
`densify` (a compressed model back in the config's dense shapes), `io` (the two folder layouts),
`cost` (FLOPs per token, layer shapes), `refit` (propagated refitting of a compressed model).

The names below are imported on first use (PEP 562), so `import compression.errors` (the CLI's
error type) does not pay for importing torch and transformers.
"""

from importlib import import_module

_EXPORTS = {
    "ALLOCATIONS": "allocation", "RankPlan": "allocation", "Unit": "allocation", "allocate": "allocation",
    "compress": "apply", "decompose_model": "apply", "make_units": "apply", "plan_ranks": "apply",
    "CalibrationStats": "calibration", "collect_stats": "calibration",
    "UserInputError": "errors",
    "flops_per_token": "cost", "shape_key": "cost",
    "load_compressed": "io", "save_compressed": "io", "save_dense": "io", "densify": "densify",
    "IdentityBlockLinear": "layers", "LowRankLinear": "layers", "prune_mlp": "layers", "replace_low_rank": "layers",
    "METHODS": "methods", "Factorization": "methods", "LayerStats": "methods", "LowRankDecomposition": "methods",
    "MatrixMethod": "methods", "MethodConfig": "methods", "MlpMethod": "methods", "NeuronDecomposition": "methods",
    "decompose": "methods", "method_config": "methods", "register": "methods",
    "MlpGroup": "targets", "Target": "targets", "find_blocks": "targets", "find_mlps": "targets",
    "find_targets": "targets", "weight_matrix": "targets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'compression' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
