"""The trainer: a pmap-style data-parallel step run with shard_map over all devices of all
processes, the paper recipes' optimiser/schedule/loss, EMA, distillation, orbax checkpoints with
exact resume, and the `mobilevis train` / `mobilevis eval` commands.

Modules: `config` (fields, overrides, finding the packaged recipes of `mobilevis_jax.configs`),
`optim` (schedules, AGC, layer-wise lr decay), `losses`, `mixup` (in-step mixup/cutmix), `ema`,
`distributed` (mesh, global batches, multi-host init), `checkpoint` (orbax state, variables,
`merge_pretrained`, `Preemption`), `best` (best evaluations, `mobilevis average`), `metrics_log`,
`step` (the jitted train and eval steps: no TensorFlow, no `mobilevis_jax.data`), `train` (the loop
and evaluation), `main` (flags). Submodules are imported on demand so `import mobilevis_jax` never
loads TensorFlow.
"""
