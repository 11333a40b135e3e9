"""Subprocess entry point of the trainer tests (a fresh process per device count / process id).

    python tests/train/worker.py train [mobilevis train flags]      # the CLI with the tiny model registered
        (MOBILEVIS_TEST_STEP_SLEEP=s sleeps s seconds after every step, so a test can kill it
        mid-run)
    python tests/train/worker.py dp OUT.json                        # 1 vs N-device step comparison
    python tests/train/worker.py recipes OUT.json TMPDIR NAME ...    # 2 steps of each packaged recipe
        (NAME '_bad_input': the bad-override checks, after the recipes)
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
  from tests.train import tiny_config
  from tests.train.tiny_model import TinyCNN

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


def recipes(out_path, tmp, names):
  """Fake ImageNet through TFDS's imagenet2012 builder, a tiny teacher checkpoint, then 2 steps of
  each named recipe's runlocal version through the CLI; one JSON record per recipe."""
  import contextlib
  import io
  import time
  import traceback

  import jax

  from mobilevis_jax import data  # noqa: F401  (native-library load order, see data/__init__)
  from mobilevis_jax.data import cli as data_cli
  from mobilevis_jax.data import fake_archives
  from mobilevis_jax.train import checkpoint as ckpt_lib
  from mobilevis_jax.train import main, train
  from tests.train.tiny_model import TinyCNN

  t0 = time.time()
  manual, data_dir = os.path.join(tmp, 'manual'), os.path.join(tmp, 'tfds')
  # 256 train images: DeiT's RASampler keeps floor(N / 256) * 256 samples per epoch, so the
  # repeated-augmentation recipes need at least 256 to take a step.
  fake_archives.write_ilsvrc2012(manual, images_per_class=127, num_val=5, size=(96, 72))
  assert data_cli.main(['prepare', 'imagenet2012', '--manual-dir', manual, '--data-dir', data_dir]) == 0
  teacher = os.path.join(tmp, 'teacher')
  tvars = jax.device_get(train.init_variables(TinyCNN(num_classes=1000), jax.random.PRNGKey(0), 16))
  ckpt_lib.save_variables(teacher, tvars, model_name='trainer_test_tiny_cnn',
                          extra={'model_kwargs': {'num_classes': 1000}})
  results = {'_setup_s': time.time() - t0, 'devices': jax.device_count()}
  common = [f'--config.data.data_dir={data_dir}', '--config.num_train_steps=2',
            '--config.data.shuffle_buffer=16', '--config.log_every_steps=1',
            '--config.checkpoint_every_steps=100', '--config.progress_bar=false',
            '--config.tensorboard=false', '--config.eval_fused=false',
            # Two steps each: XLA at -O0 compiles 0.6-0.9x the CPU time and the slower steps
            # cost nothing here (experiments/bench/RESULTS.md, xla_fast_compile).
            '--config.xla_fast_compile=true']
  bad_input = '_bad_input' in names
  for name in [n for n in names if n != '_bad_input']:
    extra = list(common)
    spec = f'{name}:runlocal'
    cfg = main._parse(['--config', spec, '--workdir', 'unused'], 'x', checkpoint=False)[1]
    if cfg.distillation.type == 'hard':
      extra += [f'--config.distillation.teacher_checkpoint={teacher}',
                '--config.distillation.teacher_model=trainer_test_tiny_cnn']
    if cfg.data.name == 'imagenet22k':  # the 1K fake archives stand in for 22K (labels < 1000)
      extra += ['--config.data.name=imagenet2012', '--config.data.builder_config=']
    if cfg.model.startswith('parameternet'):
      # jit(init) of ParameterNet's 88 dynamic convs takes minutes on 2 CPU cores (issue 10,
      # time to first step); GhostNet-0.5 is the same GhostNet tree without the expert banks.
      extra += ['--config.model=ghostnet_050']
    if cfg.init_from == '' and 'ft_in1k' in name:
      extra += [f'--config.init_from={os.path.join(tmp, "run_parameternet_600m_in22k")}']
    t = time.time()
    buf_out, buf_err = io.StringIO(), io.StringIO()
    record = {}
    try:
      with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
        code = main.main(['--config', spec, '--workdir', os.path.join(tmp, f'run_{name}'), *extra])
      record['code'] = code
      lines = [l for l in buf_out.getvalue().strip().splitlines() if l.startswith('{')]
      record['result'] = json.loads(lines[-1]) if lines else None
      rows = [json.loads(l) for l in open(os.path.join(tmp, f'run_{name}', 'metrics.jsonl'))]
      record['train'] = [r for r in rows if 'train/loss' in r]
      best = os.path.join(tmp, f'run_{name}', 'best')
      record['best'] = sorted(os.listdir(best)) if os.path.isdir(best) else []
    except BaseException as e:  # noqa: BLE001  (reported to the test, which names the recipe)
      record['code'] = -1
      record['error'] = f'{type(e).__name__}: {e}'
      record['traceback'] = traceback.format_exc()[-3000:]
    record['stderr'] = buf_err.getvalue()[-3000:]
    record['seconds'] = time.time() - t
    results[name] = record
    with open(out_path, 'w') as f:
      json.dump(results, f, indent=1, default=str)
  if not bad_input:
    return
  # Bad input fails before the first step, through the CLI, saying what to change.
  bad = {}
  for key, flags in {
      'batch_below_devices': ['--config.global_batch_size=4'],
      'wrong_teacher': [f'--config.distillation.teacher_checkpoint={teacher}',
                        '--config.distillation.teacher_model=repvit_m0_6'],
  }.items():
    buf_err = io.StringIO()
    with contextlib.redirect_stderr(buf_err), contextlib.redirect_stdout(io.StringIO()):
      code = main.main(['--config', 'repvit_m1_1_in1k:runlocal', '--workdir', os.path.join(tmp, f'bad_{key}'),
                        f'--config.data.data_dir={data_dir}', *flags])
    bad[key] = {'code': code, 'stderr': buf_err.getvalue()[-2000:],
                'stepped': os.path.exists(os.path.join(tmp, f'bad_{key}', 'checkpoints'))}
  results['_bad_input'] = bad
  with open(out_path, 'w') as f:
    json.dump(results, f, indent=1, default=str)


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
  elif mode == 'recipes':
    recipes(rest[0], rest[1], rest[2:])
  else:
    raise SystemExit(f'unknown mode {mode}')
