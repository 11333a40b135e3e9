"""The trainer's optimiser against PyTorch: timm's adaptive_clip_grad per output unit, a full
AdamW + AGC + weight-decay-filter step of the RepViT recipe against torch.optim.AdamW with timm's
param groups and AGC, and layer-wise lr decay against timm's param_groups_layer_decay."""

import jax
import numpy as np
import pytest

from mobilevis_jax.train import config as config_lib
from mobilevis_jax.train import optim

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')


def _timm_agc(params_pt: dict, grads_pt: dict, clip: float) -> dict:
  from timm.utils.agc import adaptive_clip_grad
  ps = []
  for k, v in params_pt.items():
    p = torch.nn.Parameter(torch.tensor(v))
    p.grad = torch.tensor(grads_pt[k])
    ps.append((k, p))
  adaptive_clip_grad([p for _, p in ps], clip_factor=clip, eps=1e-3)
  return {k: p.grad.numpy() for k, p in ps}


def test_agc_per_output_unit_equals_timm():
  rng = np.random.default_rng(0)
  # Flax layout -> PyTorch layout of each tensor.
  to_pt = {'conv': lambda x: x.transpose(3, 2, 0, 1),      # HWIO -> OIHW
           'dw': lambda x: x.transpose(3, 2, 0, 1),        # (kh, kw, 1, C) -> (C, 1, kh, kw)
           'dense': lambda x: x.T,                         # (in, out) -> (out, in)
           'bias': lambda x: x,
           'experts': lambda x: x}                         # DynamicConv bank [M, ...] as PyTorch
  shapes = {'conv': (3, 3, 4, 8), 'dw': (3, 3, 1, 8), 'dense': (16, 10), 'bias': (10,), 'experts': (4, 72)}
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  params['dw'][..., 0] *= 1e-5   # a unit whose parameter norm is below eps: the eps floor decides
  grads = {}
  for k, s in shapes.items():
    g = rng.normal(size=s).astype(np.float32)
    # Mix units far above and below the clipping threshold 0.02 * |w_unit|.
    scale = np.where(np.arange(s[-1] if k not in ('experts',) else 1) % 2, 1e-4, 10.0)
    grads[k] = (g * (scale if k != 'experts' else np.array([10.0, 1e-4, 10.0, 1e-4])[:, None])).astype(np.float32)
  named = {'a': {'conv': {'kernel': params['conv']}, 'dw': {'kernel': params['dw']},
                 'fc': {'kernel': params['dense'], 'bias': params['bias']}, 'dyn': {'experts': params['experts']}}}
  gnamed = {'a': {'conv': {'kernel': grads['conv']}, 'dw': {'kernel': grads['dw']},
                  'fc': {'kernel': grads['dense'], 'bias': grads['bias']}, 'dyn': {'experts': grads['experts']}}}
  tx = optim.adaptive_grad_clip(0.02, eps=1e-3)
  ours, _ = jax.jit(tx.update)(gnamed, tx.init(named), named)
  ours = jax.device_get(ours)['a']
  ours = {'conv': ours['conv']['kernel'], 'dw': ours['dw']['kernel'], 'dense': ours['fc']['kernel'],
          'bias': ours['fc']['bias'], 'experts': ours['dyn']['experts']}
  ref = _timm_agc({k: to_pt[k](v) for k, v in params.items()}, {k: to_pt[k](v) for k, v in grads.items()}, 0.02)
  for k in shapes:
    np.testing.assert_allclose(to_pt[k](np.asarray(ours[k])), ref[k], rtol=1e-6, atol=1e-9, err_msg=k)
    clipped = not np.allclose(ref[k], to_pt[k](grads[k]))
    assert clipped, f'{k}: nothing was clipped, the comparison would not test the rule'
  # Per unit, not per tensor: the small-gradient channels of the depthwise kernel are untouched.
  np.testing.assert_array_equal(np.asarray(ours['dw'])[..., 1::2], grads['dw'][..., 1::2])


def _random_variables(model, resolution, seed):
  from mobilevis_jax.models.registry import abstract_variables
  rng = np.random.default_rng(seed)
  abstract = abstract_variables(model, resolution)
  out = jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.1).astype(np.float32), abstract)
  out['batch_stats'] = jax.tree.map(lambda x: np.abs(x) + 0.5, out['batch_stats'])
  return out


def test_full_recipe_step_equals_torch_adamw_with_timm_agc_and_param_groups():
  """Three optimiser steps of the RepViT recipe (AdamW eps 1e-8, wd 0.025 with timm's no-decay
  filter, AGC 0.02, lr 4e-3) on RepViT-M0.6's parameters: same weights, same gradients."""
  from timm.optim import param_groups_weight_decay
  from timm.utils.agc import adaptive_clip_grad

  import mobilevis_jax
  from mobilevis_jax.interop import from_torch_state_dict, to_torch_state_dict
  cfg = config_lib.load_config('repvit_m1_1_in1k', ['optimizer.warmup_epochs=0'])
  name, kw = 'repvit_m0_6', {'num_classes': 10, 'distillation': True}
  model = mobilevis_jax.create_model(name, **kw)
  variables = _random_variables(model, 64, 0)
  grads_seq = [_random_variables(model, 64, 1 + i)['params'] for i in range(3)]
  for i, g in enumerate(grads_seq):  # some units far above the AGC threshold, some below
    grads_seq[i] = jax.tree.map(lambda x, i=i: x * (30.0 if i % 2 == 0 else 0.01), g)

  schedule = optim.learning_rate_schedule(cfg.optimizer, global_batch_size=2048, steps_per_epoch=10,
                                          total_steps=3000)
  assert float(schedule(np.int32(0))) == pytest.approx(4e-3)
  tx = optim.make_optimizer(cfg.optimizer, schedule, variables['params'])
  params, state = variables['params'], tx.init(variables['params'])
  update = jax.jit(tx.update)
  for g in grads_seq:
    upd, state = update(g, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, upd)
  ours = jax.device_get(params)

  # PyTorch: a module holding the same parameters under the official names.
  sd = to_torch_state_dict(name, variables, **kw)
  gsd = [to_torch_state_dict(name, {'params': g, 'batch_stats': variables['batch_stats']}, **kw)
         for g in grads_seq]
  buffers = ('running_mean', 'running_var', 'num_batches_tracked')
  keys = [k for k in sd if not k.endswith(buffers)]
  holder = torch.nn.Module()
  for k in keys:
    mod = holder
    *parents, leaf = k.split('.')
    for p in parents:
      if not hasattr(mod, p):
        mod.add_module(p, torch.nn.Module())
      mod = getattr(mod, p)
    mod.register_parameter(leaf, torch.nn.Parameter(torch.tensor(sd[k])))
  groups = param_groups_weight_decay(holder, weight_decay=0.025)
  opt = torch.optim.AdamW(groups, lr=4e-3, betas=(0.9, 0.999), eps=1e-8)
  named = dict(holder.named_parameters())
  for g in gsd:
    for k in keys:
      named[k].grad = torch.tensor(g[k])
    adaptive_clip_grad(holder.parameters(), clip_factor=0.02, eps=1e-3)  # DeiT: after backward
    opt.step()
  out_sd = dict(sd)
  out_sd.update({k: named[k].detach().numpy() for k in keys})
  ref = from_torch_state_dict(name, out_sd, **kw)['params']
  flat_ours = {optim.path_string(p): v for p, v in jax.tree_util.tree_leaves_with_path(ours)}
  flat_ref = {optim.path_string(p): v for p, v in jax.tree_util.tree_leaves_with_path(ref)}
  assert flat_ours.keys() == flat_ref.keys()
  moved = 0
  for k in flat_ours:
    np.testing.assert_allclose(flat_ours[k], flat_ref[k], rtol=1e-5, atol=2e-7, err_msg=k)
    moved += int(not np.allclose(flat_ours[k], {optim.path_string(p): v for p, v in
                                                jax.tree_util.tree_leaves_with_path(variables['params'])}[k]))
  assert moved == len(flat_ours)


def test_layer_decay_multipliers_equal_timm_ghostnet():
  """The fine-tune recipe's layer groups give every parameter timm's lr_scale for GhostNet."""
  from timm.optim import param_groups_layer_decay

  import mobilevis_jax
  from mobilevis_jax.interop import to_torch_state_dict
  cfg = config_lib.load_config('parameternet_600m_in22k_ft_in1k')
  name = 'ghostnet_100'  # the same GhostNet tree as parameternet_600m, with a timm twin
  model = mobilevis_jax.create_model(name, num_classes=10)
  variables = _random_variables(model, 64, 0)
  # Tag every parameter leaf with its index to read which torch key it becomes.
  leaves, treedef = jax.tree.flatten(variables['params'])
  tagged = jax.tree.unflatten(treedef, [np.full(l.shape, i, np.float32) for i, l in enumerate(leaves)])
  sd = to_torch_state_dict(name, {'params': tagged, 'batch_stats': variables['batch_stats']},
                           layout='timm', num_classes=10)
  mult = jax.tree.leaves(optim.layer_decay_multipliers(variables['params'], cfg.optimizer.layer_decay,
                                                       tuple(cfg.optimizer.layer_decay_groups)))
  ours = {}
  for k, v in sd.items():
    if k.endswith(('running_mean', 'running_var', 'num_batches_tracked')):
      continue
    ours[k] = mult[int(np.asarray(v).flat[0])]
  tmodel = timm.create_model('ghostnet_100', pretrained=False, num_classes=10)
  groups = param_groups_layer_decay(tmodel, weight_decay=0.05, layer_decay=0.5)
  by_id = {id(p): g['lr_scale'] for g in groups for p in g['params']}
  ref = {n: by_id[id(p)] for n, p in tmodel.named_parameters()}
  assert ours.keys() == ref.keys()
  for k in ref:
    assert ours[k] == pytest.approx(ref[k]), k
  scales = sorted(set(ref.values()))
  assert len(scales) > 10 and max(scales) == 1.0 and ref['conv_stem.weight'] == min(scales)
  # The multipliers scale the whole AdamW update of a parameter (Adam step and decoupled decay).
  tx = optim.make_optimizer(cfg.optimizer, lambda s: 1e-3, variables['params'])
  g = jax.tree.map(np.ones_like, variables['params'])
  upd, _ = tx.update(g, tx.init(variables['params']), variables['params'])
  plain = config_lib.load_config('parameternet_600m_in22k_ft_in1k', ['optimizer.layer_decay=0.0'])
  tx0 = optim.make_optimizer(plain.optimizer, lambda s: 1e-3, variables['params'])
  upd0, _ = tx0.update(g, tx0.init(variables['params']), variables['params'])
  for u, u0, m in zip(jax.tree.leaves(upd), jax.tree.leaves(upd0), mult):
    np.testing.assert_allclose(u, u0 * m, rtol=1e-6)
