"""The trainer: a pmap-style data-parallel step run with shard_map over all devices of all
processes, the paper recipes' optimiser/schedule/loss, EMA, distillation, orbax checkpoints with
exact resume, and the `mobilevis train` / `mobilevis eval` commands.

Modules: `config` (fields and overrides), `default_config` (the digits recipe), `optim`,
`losses`, `ema`, `distributed` (mesh, global batches, multi-host init), `checkpoint`,
`metrics_log`, `synthetic` (a test data source), `train` (pure functions and the loop), `main`
(flags). Submodules are imported on demand so `import mobilevis_jax` never loads TensorFlow.
"""
