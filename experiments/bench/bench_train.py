"""Training throughput: the trainer's jitted data-parallel step vs a PyTorch training step.

Both sides train the same RepViT (random init, one head) on the same random batch with the
RepViT recipe's step: label-smoothed cross-entropy, AGC 0.02, AdamW with masked weight decay. The
PyTorch side is the test reference of the official module tree
(mobilevis_jax/torch_models/repvit.py)
in eager mode. Both are timed in this one run on the same machine; the script prints images/s of
each and the ratio JAX / PyTorch.

    python experiments/bench/bench_train.py                     # repvit_m1_1, 224x224, batch 32
    python experiments/bench/bench_train.py --quick             # seconds: m0_6, 64x64, batch 8
    python experiments/bench/bench_train.py --device gpu        # both on the accelerator

Timing: after `--warmup` steps (compilation, cuDNN autotuning), `--steps` steps are timed with a
device sync at the end (block_until_ready / cuda.synchronize).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
sys.path.insert(0, ROOT)


def bench_jax(model_name, resolution, batch, steps, warmup, half):
  import jax
  import numpy as np

  import mobilevis_jax
  from mobilevis_jax.train import distributed, optim, train
  from mobilevis_jax.train.config import base_config

  cfg = base_config()
  cfg.optimizer.agc_clip = 0.02
  cfg.optimizer.weight_decay = 0.025
  cfg.data.label_smoothing = 0.1
  cfg.half_precision = half
  model = mobilevis_jax.create_model(model_name, num_classes=1000)
  mesh = distributed.make_data_mesh()
  variables = jax.device_get(train.init_variables(model, jax.random.PRNGKey(0), resolution))
  schedule = optim.learning_rate_schedule(cfg.optimizer, global_batch_size=batch,
                                          steps_per_epoch=100, total_steps=1000)
  tx = optim.make_optimizer(cfg.optimizer, schedule, variables['params'])
  state = train.create_train_state(variables, tx, np.asarray(jax.random.PRNGKey(1)), False)
  state = jax.device_put(state, distributed.replicated(mesh))
  step = train.make_train_step(mesh, model=model, tx=tx, schedule=schedule,
                               opts=train.StepOptions.from_config(cfg, 1000))
  rng = np.random.default_rng(0)
  batch_np = {'image': rng.normal(size=(batch, resolution, resolution, 3)).astype(np.float32),
              'label': rng.integers(0, 1000, size=batch).astype(np.int32)}
  gbatch = distributed.global_batch(batch_np, mesh)
  t0 = time.perf_counter()
  for _ in range(warmup):
    state, metrics = step(state, gbatch, {})
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, gbatch, {})
  jax.block_until_ready((state, metrics))
  dt = time.perf_counter() - t0
  return {'images_per_s': steps * batch / dt, 'warmup_s': compile_s,
          'device': str(jax.devices()[0]), 'n_devices': len(jax.devices())}


def bench_torch(model_name, resolution, batch, steps, warmup, device, half):
  import torch
  import torch.nn.functional as F

  from mobilevis_jax.torch_models.repvit import RepViT

  torch.manual_seed(0)
  dev = torch.device('cuda' if device == 'gpu' else 'cpu')
  model = RepViT(model_name, num_classes=1000, distillation=False).to(dev).train()
  decay = [p for p in model.parameters() if p.ndim > 1]
  no_decay = [p for p in model.parameters() if p.ndim <= 1]
  opt = torch.optim.AdamW([{'params': decay, 'weight_decay': 0.025},
                           {'params': no_decay, 'weight_decay': 0.0}], lr=1e-3, eps=1e-8)

  def agc(parameters, clip=0.02, eps=1e-3):
    # timm's adaptive_clip_grad: unit-wise (per output) norms.
    for p in parameters:
      if p.grad is None:
        continue
      dims = tuple(range(1, p.ndim)) if p.ndim > 1 else None
      pn = torch.linalg.vector_norm(p.detach(), dim=dims, keepdim=p.ndim > 1).clamp(min=eps) * clip
      gn = torch.linalg.vector_norm(p.grad.detach(), dim=dims, keepdim=p.ndim > 1)
      p.grad.detach().copy_(torch.where(gn < pn, p.grad, p.grad * (pn / gn.clamp(min=1e-6))))

  x = torch.randn(batch, 3, resolution, resolution, device=dev)
  y = torch.randint(0, 1000, (batch,), device=dev)
  amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=half)

  def one():
    opt.zero_grad(set_to_none=True)
    with amp:
      loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
    loss.backward()
    agc(model.parameters())
    opt.step()
    return loss

  sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
  for _ in range(warmup):
    one()
  sync()
  t0 = time.perf_counter()
  for _ in range(steps):
    one()
  sync()
  dt = time.perf_counter() - t0
  return {'images_per_s': steps * batch / dt, 'device': str(dev),
          'threads': torch.get_num_threads()}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--model', default='repvit_m1_1')
  p.add_argument('--resolution', type=int, default=224)
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--device', choices=('cpu', 'gpu'), default='cpu')
  p.add_argument('--half', action='store_true', help='bfloat16 compute on both sides')
  p.add_argument('--quick', action='store_true', help='tiny smoke run (seconds)')
  args = p.parse_args(argv)
  if args.quick:
    args.model, args.resolution, args.batch, args.steps, args.warmup = 'repvit_m0_6', 64, 8, 2, 1
  if args.device == 'cpu':
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  j = bench_jax(args.model, args.resolution, args.batch, args.steps, args.warmup, args.half)
  t = bench_torch(args.model, args.resolution, args.batch, args.steps, args.warmup, args.device,
                  args.half)
  result = {'model': args.model, 'resolution': args.resolution, 'batch': args.batch,
            'half': args.half, 'cpu': platform.processor() or platform.machine(),
            'cores': os.cpu_count(), 'jax': j, 'torch': t,
            'ratio_jax_over_torch': j['images_per_s'] / t['images_per_s']}
  print(f"jax {j['images_per_s']:.1f} img/s ({j['device']}), torch {t['images_per_s']:.1f} img/s "
        f"({t['device']}), ratio {result['ratio_jax_over_torch']:.2f}")
  print(json.dumps(result))
  return 0


if __name__ == '__main__':
  sys.exit(main())
