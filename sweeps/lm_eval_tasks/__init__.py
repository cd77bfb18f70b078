"""Local lm-evaluation-harness tasks (no network): their YAML files, the JSONL data they read
(made from packaged text by `build`), and the loader the YAML files name (`local_data`).
Registered with `lm_eval.tasks.TaskManager(include_path=<this folder>)`; `lrsweep evaluate` and
`final_eval` do that for you. The tag `lrsweep_local` runs all three."""
