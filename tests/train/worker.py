"""Subprocess entry point of the trainer tests (a fresh process per device count / process id).

    python tests/train/worker.py train [mobilevis train flags]      # the CLI with the tiny model registered
        (MOBILEVIS_TEST_STEP_SLEEP=s sleeps s seconds after every step, so a test can kill it mid-run)
    python tests/train/worker.py dp OUT.json                        # 1 vs N-device step comparison
"""

import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..')))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import tests.train.tiny_model  # noqa: E402,F401  (registers the tiny model)


def data_parallel(out_path):
  """One step of the same global batch on a 1-device and on an all-device mesh."""
  import jax
  import numpy as np
  from mobilevis_jax.train import distributed, optim, train
  from tests.train.tiny_model import TinyCNN
  from tests.train import tiny_config

  cfg = tiny_config.get_config()
  cfg.ema_decay = 0.0
  cfg.optimizer.warmup_steps = 0  # a full-size first update, so parameter differences are visible
  model = TinyCNN(num_classes=10)
  rng = jax.random.PRNGKey(0)
  variables = jax.device_get(train.init_variables(model, rng, 16))  # host copy: steps donate device buffers
  schedule = optim.learning_rate_schedule(cfg.optimizer, global_batch_size=32, steps_per_epoch=10, total_steps=10)
  tx = optim.make_optimizer(cfg.optimizer, schedule, variables['params'])
  data = np.random.default_rng(0)
  batch = {'image': data.normal(size=(32, 16, 16, 3)).astype(np.float32),
           'label': data.integers(0, 10, size=32).astype(np.int32)}
  n = jax.device_count()

  compiled = {}

  def run(devices, sync, local_batch):
    mesh = distributed.make_data_mesh(devices)
    key = (len(devices), sync)
    if key not in compiled:  # compile once per (mesh, BN mode): the per-shard runs reuse it
      cfg.sync_batchnorm = sync
      opts = train.StepOptions.from_config(cfg, 10)
      compiled[key] = train.make_train_step(mesh, model=model, tx=tx, schedule=schedule, opts=opts)
    step = compiled[key]
    state = jax.device_put(train.create_train_state(variables, tx, np.asarray(rng), False),
                           distributed.replicated(mesh))
    state, metrics = step(state, distributed.global_batch(local_batch, mesh), {})
    return distributed.to_host((state.params, state.batch_stats, metrics))

  def flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])

  one = run(jax.devices()[:1], True, batch)
  many_sync = run(jax.devices(), True, batch)
  many_local = run(jax.devices(), False, batch)
  # Per-device BN reference: each device's shard alone on one device; the loss of the N-device
  # step is the mean of these, and so are the running statistics.
  shard = 32 // n
  shards = [run(jax.devices()[:1], False, {k: v[i * shard:(i + 1) * shard] for k, v in batch.items()})
            for i in range(n)]
  result = {
      'devices': n,
      'sync_loss_diff': abs(float(one[2]['loss']) - float(many_sync[2]['loss'])),
      'sync_param_maxdiff': float(np.max(np.abs(flat(one[0]) - flat(many_sync[0])))),
      'sync_stats_maxdiff': float(np.max(np.abs(flat(one[1]) - flat(many_sync[1])))),
      'param_update_max': float(np.max(np.abs(flat(one[0]) - flat(variables['params'])))),
      'local_loss_vs_shard_mean': abs(float(many_local[2]['loss']) - float(np.mean([float(s[2]['loss']) for s in shards]))),
      'local_stats_vs_shard_mean': float(np.max(np.abs(flat(many_local[1]) - np.mean([flat(s[1]) for s in shards], 0)))),
      'local_vs_sync_loss_diff': abs(float(many_local[2]['loss']) - float(many_sync[2]['loss'])),
      'local_vs_sync_param_maxdiff': float(np.max(np.abs(flat(many_local[0]) - flat(many_sync[0])))),
  }
  with open(out_path, 'w') as f:
    json.dump(result, f)


if __name__ == '__main__':
  mode, rest = sys.argv[1], sys.argv[2:]
  if mode == 'train':
    from mobilevis_jax.train.main import main
    sleep = float(os.environ.get('MOBILEVIS_TEST_STEP_SLEEP', '0'))
    if sleep:
      import functools
      import time
      from mobilevis_jax.train import train
      train.train_and_evaluate = functools.partial(train.train_and_evaluate,
                                                   on_step=lambda step: time.sleep(sleep))
    sys.exit(main(rest))
  elif mode == 'dp':
    data_parallel(rest[0])
  else:
    raise SystemExit(f'unknown mode {mode}')
