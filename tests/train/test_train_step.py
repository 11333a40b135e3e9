"""One training step of the trainer against the same step computed without it.

The reference uses only `model.apply`, `jax.grad` and the AdamW / label-smoothing / EMA formulas
written out in numpy, so a wrong mask, schedule, loss, BN-statistics or EMA wiring in the trainer
changes the result.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilevis_jax.train import distributed, optim, train
from tests.train import tiny_config
from tests.train.tiny_model import TinyCNN

NUM_CLASSES = 10


def _setup(**cfg_overrides):
  cfg = tiny_config.get_config()
  cfg.optimizer.warmup_steps = 0
  cfg.optimizer.weight_decay = 0.1
  for k, v in cfg_overrides.items():
    node = cfg
    *parents, leaf = k.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = v
  model = TinyCNN(num_classes=NUM_CLASSES, distillation=False)
  variables = jax.device_get(train.init_variables(model, jax.random.PRNGKey(1), 16))
  data = np.random.default_rng(0)
  batch = {'image': data.normal(size=(8, 16, 16, 3)).astype(np.float32),
           'label': data.integers(0, NUM_CLASSES, size=8).astype(np.int32)}
  return cfg, model, variables, batch


def _trainer_step(cfg, model, variables, batch, split=None, emitter='mlir'):
  mesh = distributed.make_data_mesh(jax.devices()[:1])
  schedule = optim.learning_rate_schedule(cfg.optimizer, global_batch_size=8, steps_per_epoch=10,
                                          total_steps=100)
  tx = optim.make_optimizer(cfg.optimizer, schedule, variables['params'])
  opts = train.StepOptions.from_config(cfg, NUM_CLASSES)
  state = jax.device_put(train.create_train_state(variables, tx, np.asarray(jax.random.PRNGKey(2)),
                                                  cfg.ema_decay > 0), distributed.replicated(mesh))
  step = train.make_train_step(mesh, model=model, tx=tx, schedule=schedule, opts=opts,
                               fast_compile=cfg.xla_fast_compile, split=split, emitter=emitter)
  assert step.split == (jax.default_backend() == 'cpu' if split is None else split)
  new_state, metrics = step(state, distributed.global_batch(batch, mesh), {})
  return distributed.to_host(new_state), distributed.to_host(metrics)


def _reference_step(cfg, model, variables, batch):
  """Loss, grads and new BN stats with plain Flax; AdamW step 1 written out in numpy."""
  smoothing = cfg.data.label_smoothing
  targets = np.full((8, NUM_CLASSES), smoothing / NUM_CLASSES, np.float32)
  targets[np.arange(8), batch['label']] += 1.0 - smoothing

  def loss_fn(params):
    logits, mutated = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                  batch['image'], train=True, mutable=['batch_stats'])
    return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), -1)), mutated['batch_stats']

  (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables['params'])
  o = cfg.optimizer
  lr = o.base_lr  # no warm-up, cosine at step 0
  # Adam's first step: m_hat = g, v_hat = g^2, so the update is g / (|g| + eps).
  def adamw(path, p, g):
    p, g = np.asarray(p, np.float64), np.asarray(g, np.float64)
    decay = o.weight_decay if p.ndim > 1 else 0.0  # timm: no decay on 1-D params
    return (p - lr * (g / (np.abs(g) + o.eps) + decay * p)).astype(np.float32)
  new_params = jax.tree_util.tree_map_with_path(adamw, variables['params'], jax.device_get(grads))
  return float(loss), new_params, jax.device_get(stats)


@pytest.mark.parametrize('fast_compile,split,emitter', [
    (False, False, 'mlir'), (False, True, 'mlir'), (False, True, 'elemental'),
    (True, False, 'mlir'), (True, True, 'elemental')],
    ids=['one_program', 'split', 'split_elemental', 'one_program_fast_compile',
         'split_elemental_fast_compile'])
def test_one_step_matches_independent_computation(fast_compile, split, emitter):
  # `xla_fast_compile` (XLA's backend at -O0), the step as two programs and either fusion
  # emitter must all be the same step: same tolerances.
  cfg, model, variables, batch = _setup(xla_fast_compile=fast_compile)
  state, metrics = _trainer_step(cfg, model, variables, batch, split=split, emitter=emitter)
  loss, params, stats = _reference_step(cfg, model, variables, batch)
  np.testing.assert_allclose(metrics['loss'], loss, rtol=1e-6)
  np.testing.assert_allclose(metrics['lr'], cfg.optimizer.base_lr, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree.leaves(state.batch_stats), jax.tree.leaves(stats)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # EMA of params and BN statistics after one step: decay * init + (1 - decay) * new.
  d = cfg.ema_decay
  for e, p0, p1 in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(variables['params']),
                       jax.tree.leaves(state.params)):
    np.testing.assert_allclose(e, d * p0 + (1 - d) * p1, rtol=1e-6, atol=1e-7)
  for e, s0, s1 in zip(jax.tree.leaves(state.ema_batch_stats), jax.tree.leaves(variables['batch_stats']),
                       jax.tree.leaves(state.batch_stats)):
    np.testing.assert_allclose(e, d * s0 + (1 - d) * s1, rtol=1e-6, atol=1e-7)
  assert int(state.step) == 1


def test_gradient_accumulation_equals_mean_of_micro_batch_gradients():
  # Two micro-batches of 4: the update uses the mean gradient, BN statistics advance twice.
  cfg, model, variables, batch = _setup(grad_accum_steps=2, ema_decay=0.0)
  cfg.optimizer.weight_decay = 0.0
  state, metrics = _trainer_step(cfg, model, variables, batch)

  stats = variables['batch_stats']
  grads, losses = [], []
  for half in (slice(0, 4), slice(4, 8)):
    sub = {k: v[half] for k, v in batch.items()}
    targets = np.full((4, NUM_CLASSES), 0.01, np.float32)
    targets[np.arange(4), sub['label']] += 0.9

    def loss_fn(params, stats=stats, sub=sub, targets=targets):
      logits, mutated = model.apply({'params': params, 'batch_stats': stats}, sub['image'], train=True,
                                    mutable=['batch_stats'])
      return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), -1)), mutated['batch_stats']

    (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(variables['params'])
    grads.append(g)
    losses.append(float(loss))
  g = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
  lr, eps = cfg.optimizer.base_lr, cfg.optimizer.eps
  expected = jax.tree.map(lambda p, g: p - lr * g / (np.abs(g) + eps), variables['params'], g)
  np.testing.assert_allclose(metrics['loss'], np.mean(losses), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree.leaves(state.batch_stats), jax.tree.leaves(stats)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_bf16_step_stays_close_to_fp32_and_keeps_fp32_state():
  cfg, model, variables, batch = _setup(half_precision=True, ema_decay=0.0)
  state, metrics = _trainer_step(cfg, model, variables, batch)
  loss, _, _ = _reference_step(cfg, model, variables, batch)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves((state.params, state.batch_stats, state.opt_state))
             if np.issubdtype(x.dtype, np.floating))
  assert abs(metrics['loss'] - loss) < 0.05 * abs(loss)   # bf16 rounding, not a different loss
  assert metrics['loss'] != pytest.approx(loss, rel=1e-7)  # ... but bf16 was really used


def test_hard_distillation_loss_uses_teacher_argmax():
  from mobilevis_jax.train import losses
  logits = jnp.array([[2.0, 0.0, 0.0]])
  dist = jnp.array([[0.0, 3.0, 0.0]])
  targets = jnp.array([[1.0, 0.0, 0.0]])
  teacher = jnp.array([[0.1, 0.2, 5.0]])
  got = losses.hard_distillation_loss(logits, dist, targets, teacher, alpha=0.5)
  ce_cls = -jax.nn.log_softmax(logits)[0, 0]
  ce_dist = -jax.nn.log_softmax(dist)[0, 2]
  np.testing.assert_allclose(got, 0.5 * ce_cls + 0.5 * ce_dist, rtol=1e-6)


def test_fast_compile_options_apply_on_cpu_only_when_asked():
  from mobilevis_jax.train import step
  assert step.compiler_options(False) is None
  expected = step.FAST_COMPILE_OPTIONS if jax.default_backend() == 'cpu' else None
  assert step.compiler_options(True) == expected


def test_split_step_equals_one_program_and_compiles_ahead_per_batch_signature():
  cfg, model, variables, batch = _setup()
  one_state, one_metrics = _trainer_step(cfg, model, variables, batch, split=False)

  mesh = distributed.make_data_mesh(jax.devices()[:1])
  schedule = optim.learning_rate_schedule(cfg.optimizer, global_batch_size=8, steps_per_epoch=10,
                                          total_steps=100)
  tx = optim.make_optimizer(cfg.optimizer, schedule, variables['params'])
  opts = train.StepOptions.from_config(cfg, NUM_CLASSES)
  replicated = distributed.replicated(mesh)
  state = jax.device_put(train.create_train_state(variables, tx, np.asarray(jax.random.PRNGKey(2)),
                                                  cfg.ema_decay > 0), replicated)
  step = train.make_train_step(mesh, model=model, tx=tx, schedule=schedule, opts=opts, split=True)
  gbatch = distributed.global_batch(batch, mesh)
  # Compiled ahead from shapes alone, in an executor's threads, as the trainer does.
  abstract = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
  import concurrent.futures
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    step.compile(abstract(state), abstract(gbatch), {}, executor=pool)
  assert len(step._compiled) == 1
  lowered = []
  original_lower = step._lower_each
  step._lower_each = lambda *a: lowered.append(a) or original_lower(*a)
  new_state, metrics = step(state, gbatch, {})
  assert not lowered  # the first call ran what was compiled ahead
  new_state, metrics = distributed.to_host(new_state), distributed.to_host(metrics)
  assert sorted(metrics) == sorted(one_metrics)
  for k in metrics:
    np.testing.assert_allclose(metrics[k], one_metrics[k], rtol=1e-6, err_msg=k)
  # The same fusions either way (XLA's default emitter): equal to float rounding. (The gradients of
  # a BatchNorm network at batch 8 are ill-conditioned, hence the tolerance on Adam's moments.)
  for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(one_state)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.max(np.abs(b)))

  # A batch of another shape (ParC-Net's multi-scale sampler) compiles its own programs.
  state = jax.device_put(new_state, replicated)
  small = {'image': batch['image'][:4, :12, :12], 'label': batch['label'][:4]}
  step(state, distributed.global_batch(small, mesh), {})
  assert len(lowered) == 1 and len(step._compiled) == 2


def test_grads_emitter_table_and_bad_choices():
  from mobilevis_jax.train import step
  assert step.grads_emitter('parameternet') == 'elemental'
  assert step.grads_emitter('repvit') == 'mlir'
  assert step.grads_emitter('parameternet', 'mlir') == 'mlir'
  with pytest.raises(ValueError, match='xla_cpu_grads_emitter'):
    step.grads_emitter('repvit', 'llvm')
  cfg, model, variables, _ = _setup()
  mesh = distributed.make_data_mesh(jax.devices()[:1])
  tx = optim.make_optimizer(cfg.optimizer, lambda s: 1e-3, variables['params'])
  with pytest.raises(ValueError, match='emitter must be one of'):
    train.make_train_step(mesh, model=model, tx=tx, schedule=lambda s: 1e-3,
                          opts=train.StepOptions.from_config(cfg, NUM_CLASSES), emitter='x')
