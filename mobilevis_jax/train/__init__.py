"""The trainer: a pmap-style data-parallel step run with shard_map over all devices of all
processes, the paper recipes' optimiser/schedule/loss, EMA, distillation, orbax checkpoints with
exact resume, and the `mobilevis train` / `mobilevis eval` commands.

Modules: `config` (fields and overrides), `default_config` (the digits recipe, a config file
that `config` loads), `optim`, `losses`, `mixup` (in-step mixup/cutmix), `ema`, `distributed`
(mesh, global batches, multi-host init), `checkpoint` (orbax state, variables, `merge_pretrained`,
`Preemption`), `metrics_log`, `step` (the jitted train and eval steps: no TensorFlow, no
`mobilevis_jax.data`), `train` (the loop and evaluation), `main` (flags). Submodules are imported
on demand so `import mobilevis_jax` never loads TensorFlow.
"""
