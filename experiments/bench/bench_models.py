"""Every family's reference variant, JAX against PyTorch: forward (unfused, fused) and train step.

For each model, on this machine and in this one run, with the two frameworks timed back to back
per row (so machine load affects both sides of a ratio alike):

* ``fwd``: jitted ``model.apply(train=False)`` against the PyTorch module of the official tree
  (``mobilevis_jax/torch_models/<family>.py``)
  in eval mode under ``torch.inference_mode``, channels_last;
* ``fwd-fused``: where ``mv.can_fuse`` (RepViT), ``mv.fuse``'s model against the reference's own
  re-parameterisation;
* ``train``: one step of forward + backward + AdamW (cross-entropy on random labels, BN in train
  mode) -- jitted JAX with the state donated, PyTorch eager ``loss.backward(); opt.step()``;
* where timm has the model (``repvit_m1_1``, ``ghostnet_100``), timm's module as a second
  PyTorch column (for ``ghostnet_100`` timm *is* the official reference).

Printed per row: median ms of both sides (``mobilevis_jax.timing.median_ms``) and the speed
ratio ``jax_speed / torch_speed = torch_ms / jax_ms`` (> 1: JAX faster). Weights are random
(timing does not depend on them), the kernel paths each JAX model takes are printed first
(``mobilevis_jax.layers.kernels.kernel_report``).

    python experiments/bench/bench_models.py                           # all families, batch 1, 32
    python experiments/bench/bench_models.py --models repvit_m1_1 --batches 32 --modes fwd
    python experiments/bench/bench_models.py --quick                   # smoke: 2-stage RepViT
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import mobilevis_jax as mv  # noqa: E402
from mobilevis_jax.layers import kernels  # noqa: E402
from mobilevis_jax.models.registry import abstract_variables  # noqa: E402
from mobilevis_jax.timing import median_ms  # noqa: E402

MODES = ("fwd", "fwd-fused", "train")


# ----------------------------------------------------------------------------------------------
# PyTorch references: (official-tree factory, timm name or None, official fuse or None)
# ----------------------------------------------------------------------------------------------
def _repvit(name):
  from mobilevis_jax.torch_models import repvit as R
  return lambda: R.RepViT(name, distillation=False), R.fuse_model


def _mobilevig(name):
  from mobilevis_jax.torch_models import mobilevig as R
  return lambda: R.build(name), None


def _parameternet(name):
  from mobilevis_jax.torch_models import parameternet as R
  return getattr(R, name), None


def _ghostnet_timm(name):
  import timm
  return lambda: timm.create_model(name, pretrained=False), None


def _parcnet(name):
  from mobilevis_jax.torch_models.parcnet import ParCNetRef
  return lambda: ParCNetRef(name.split("_")[1]), None


def _parc_convnets(name):
  from mobilevis_jax.torch_models import parc_convnets as R
  return R.BUILDERS[name], None


def _tiny_repvit(name):
  # Two stages of RepViT (one block each, widths 16/32): the smoke run's model, small enough to
  # compile a train step in seconds. Registered in the reference's row table under ``name``.
  from mobilevis_jax.torch_models import repvit as R
  R.ROW_TABLES.setdefault(name, ((16, "10"), (32, "D10")))
  return _repvit(name)


def _jax(name, **kw):
  return lambda: mv.create_model(name, **kw)


def _jax_tiny_repvit():
  from mobilevis_jax.models.repvit import RepViT
  return RepViT(widths=(16, 32), depths=(1, 1), num_classes=1000)


# name -> (resolution, reference builder, timm name, JAX model factory)
MODELS = {
    "repvit_m1_1": (224, _repvit, "repvit_m1_1", _jax("repvit_m1_1", distillation=False)),
    "mobilevig_s": (224, _mobilevig, None, _jax("mobilevig_s", distillation=False)),
    "parameternet_600m": (224, _parameternet, None, _jax("parameternet_600m")),
    "ghostnet_100": (224, _ghostnet_timm, None, _jax("ghostnet_100")),  # timm: its official tree
    "parcnet_s": (256, _parcnet, None, _jax("parcnet_s")),
    "parc_convnext_xt": (224, _parc_convnets, None, _jax("parc_convnext_xt")),
    "parc_resnet50": (224, _parc_convnets, None, _jax("parc_resnet50")),
    "parc_mobilenetv2": (224, _parc_convnets, None, _jax("parc_mobilenetv2")),
}
QUICK = {"repvit_tiny": (32, _tiny_repvit, None, _jax_tiny_repvit)}


def random_variables(model, resolution: int):
  """Random weights of the abstract shapes (compiling ``init`` takes minutes for some models)."""
  shapes = abstract_variables(model, resolution)
  rng = np.random.default_rng(0)

  def fill(path, s):
    if jax.tree_util.keystr(path).endswith("['var']"):
      return jnp.ones(s.shape, s.dtype)  # BN running variance must be positive
    return jnp.asarray(0.05 * rng.standard_normal(s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _logits(out):
  return out[0] if isinstance(out, (tuple, list)) else out


# ----------------------------------------------------------------------------------------------
# JAX side
# ----------------------------------------------------------------------------------------------
def jax_forward(model, variables, x):
  fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return lambda: fn(variables, x)


def make_jax_train_step(model, variables):
  """``(step, state)``: the jitted forward + backward + AdamW step (state donated) and a first
  state built from copies of ``variables`` (the step donates it; the caller's arrays survive)."""
  tx = optax.adamw(1e-3, weight_decay=0.05)
  params = variables["params"]
  extra = {k: v for k, v in variables.items() if k != "params"}

  def loss_fn(params, extra, x, y, rng):
    out, new_extra = model.apply({"params": params, **extra}, x, train=True,
                                 mutable=list(extra), rngs={"dropout": rng})
    loss = optax.softmax_cross_entropy_with_integer_labels(_logits(out), y).mean()
    return loss, new_extra

  def step(state, x, y):
    params, extra, opt_state, rng = state
    rng, sub = jax.random.split(rng)
    (loss, extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, extra, x, y, sub)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), extra, opt_state, rng), loss

  params, extra = jax.tree.map(jnp.copy, (params, extra))
  return jax.jit(step, donate_argnums=0), (params, extra, tx.init(params), jax.random.PRNGKey(0))


def jax_train_step(model, variables, x, labels):
  """Jitted forward + backward + AdamW with the state donated; returns a no-arg step."""
  step, state = make_jax_train_step(model, variables)
  holder = [state]

  def run():
    holder[0], loss = step(holder[0], x, labels)
    return loss

  return run


# ----------------------------------------------------------------------------------------------
# PyTorch side
# ----------------------------------------------------------------------------------------------
def torch_forward(module, x):
  import torch
  module = module.eval().to(memory_format=torch.channels_last)
  x = x.contiguous(memory_format=torch.channels_last)

  def run():
    with torch.inference_mode():
      return module(x)

  return run


def torch_train_step(module, x, labels):
  import torch
  import torch.nn.functional as F
  module = module.train().to(memory_format=torch.channels_last)
  x = x.contiguous(memory_format=torch.channels_last)
  opt = torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=0.05)

  def run():
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(_logits(module(x)), labels)
    loss.backward()
    opt.step()
    return loss.detach()

  return run


# ----------------------------------------------------------------------------------------------
def bench_model(name, spec, batches, modes, reps_for, log):
  import torch
  res, ref_builder, timm_name, jax_factory = spec
  factory, torch_fuse = ref_builder(name)
  model = jax_factory()
  paths = kernels.summarize(kernels.kernel_report(model, (1, res, res, 3), train=False))
  log(f"# {name} @{res}: kernel paths {paths}")
  variables = random_variables(model, res)
  refs = {"torch": factory()}
  if timm_name is not None:
    import timm
    refs["timm"] = timm.create_model(timm_name, pretrained=False)
  fusable = mv.can_fuse(model)
  if fusable:
    fused_model, fused_vars = mv.fuse(model, variables)
  rows = []
  for batch in batches:
    reps = reps_for(batch)
    rng = np.random.default_rng(batch)
    x = rng.standard_normal((batch, res, res, 3)).astype(np.float32)
    y = rng.integers(0, 1000, size=batch)
    xj, yj = jnp.asarray(x), jnp.asarray(y, jnp.int32)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    yt = torch.from_numpy(y.astype(np.int64))
    for mode in modes:
      if mode == "fwd-fused" and not fusable:
        continue
      t0 = time.perf_counter()
      if mode == "fwd":
        jfn = jax_forward(model, variables, xj)
        tfns = {k: torch_forward(m, xt) for k, m in refs.items()}
      elif mode == "fwd-fused":
        jfn = jax_forward(fused_model, fused_vars, xj)
        tfns = {"torch": torch_forward(torch_fuse(refs["torch"].eval()), xt)} if torch_fuse else {}
        if "timm" in refs:
          import copy

          from timm.utils.model import reparameterize_model
          tfns["timm"] = torch_forward(reparameterize_model(copy.deepcopy(refs["timm"]).eval()), xt)
      else:
        jfn = jax_train_step(model, variables, xj, yj)
        tfns = {k: torch_train_step(factory() if k == "torch" else m, xt, yt)
                for k, m in refs.items()}
      jax.block_until_ready(jfn())  # compile outside the timed region
      compile_s = time.perf_counter() - t0
      row = dict(model=name, res=res, batch=batch, mode=mode, compile_s=compile_s,
                 jax_ms=median_ms(jfn, reps=reps))
      for k, fn in tfns.items():
        try:
          row[f"{k}_ms"] = median_ms(fn, reps=reps)
        except ValueError as e:
          # PyTorch refuses train-mode BatchNorm over a single value per channel (the BN1d
          # classifier heads at batch 1); JAX computes it (zero variance), so nothing to compare.
          log(f"  {k} {mode} batch {batch}: not run ({str(e).splitlines()[0]})")
          continue
        row[f"{k}_ratio"] = row[f"{k}_ms"] / row["jax_ms"]
      rows.append(row)
      log(format_row(row))
  return rows


HEADER = (f"{'model':<18} {'res':>4} {'batch':>5} {'mode':<9} | {'jax ms':>9} {'torch ms':>9} "
          f"{'ratio':>6} | {'timm ms':>9} {'ratio':>6} | {'compile s':>9}")


def format_row(r) -> str:
  timm = (f"{r['timm_ms']:9.1f} {r['timm_ratio']:5.2f}x" if "timm_ms" in r
          else f"{'-':>9} {'-':>6}")
  torch = (f"{r['torch_ms']:9.1f} {r['torch_ratio']:5.2f}x" if "torch_ms" in r
           else f"{'-':>9} {'-':>6}")
  return (f"{r['model']:<18} {r['res']:>4} {r['batch']:>5} {r['mode']:<9} | {r['jax_ms']:9.1f} "
          f"{torch} | {timm} | {r['compile_s']:9.1f}")


def main(argv=None) -> list[dict]:
  import torch
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: a 2-stage RepViT at 32 px, batch 2, 1 repetition")
  parser.add_argument("--models", nargs="+", default=None, help="subset of the model names")
  parser.add_argument("--batches", type=int, nargs="+", default=None)
  parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
  parser.add_argument("--reps", type=int, default=None, help="timed calls per row")
  parser.add_argument("--json", default=None, help="also write the rows to this file")
  parser.add_argument("--torch-threads", type=int, default=None,
                      help="torch intra-op threads (default: torch's; on an oversubscribed "
                      "machine 1 avoids OpenMP spin-wait stalls)")
  args = parser.parse_args(argv)
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  table = QUICK if args.quick else MODELS
  names = args.models or list(table)
  unknown = [n for n in names if n not in table]
  if unknown:
    raise SystemExit(f"unknown models {unknown}; choose from {sorted(table)}")
  batches = args.batches or ([2] if args.quick else [1, 32])

  def reps_for(batch):
    if args.reps:
      return args.reps
    return 1 if args.quick else (10 if batch == 1 else 3)

  def log(s):
    print(s, flush=True)

  log(f"{platform.node()} {platform.processor() or platform.machine()} cpus={os.cpu_count()} "
      f"jax {jax.__version__} backend={jax.default_backend()} torch {torch.__version__} "
      f"threads={torch.get_num_threads()} loadavg={os.getloadavg()[0]:.1f}")
  log("ratio = torch ms / jax ms (JAX speed relative to PyTorch; > 1: JAX faster)")
  log(HEADER)
  rows = []
  for name in names:
    rows += bench_model(name, table[name], batches, args.modes, reps_for, log)
  log("\nsummary\n" + HEADER)
  for r in rows:
    log(format_row(r))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
