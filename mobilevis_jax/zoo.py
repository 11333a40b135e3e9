"""The model zoo table: parameters, MACs and, for re-parameterisable models, how closely the fused
model reproduces the unfused one."""
from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from mobilevis_jax.models.registry import (
  abstract_variables,
  can_fuse,
  create_model,
  fuse,
  list_models,
  model_info,
)
from mobilevis_jax.profiling import profile


def _path_key(rng: jax.Array, path) -> jax.Array:
  # crc32, not hash(): Python salts str hashes per process, which made the table irreproducible.
  return jax.random.fold_in(rng, zlib.crc32(jax.tree_util.keystr(path).encode()) % (2 ** 31))


def randomize_batch_stats(variables: dict, rng: jax.Array) -> dict:
  """Random BN affine parameters and running statistics, so that folding BN is really tested.

  Freshly initialised BN (scale 1, bias 0, mean 0, var 1) is nearly the identity and would let a
  wrong fusion pass unnoticed.
  """
  def perturb(path, leaf):
    name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
    key = _path_key(rng, path)
    if name == "var":
      return jax.random.uniform(key, leaf.shape, leaf.dtype, 0.5, 2.0)
    if name == "mean":
      return 0.1 * jax.random.normal(key, leaf.shape, leaf.dtype)
    return leaf

  stats = jax.tree_util.tree_map_with_path(perturb, variables.get("batch_stats", {}))

  def perturb_bn_params(path, leaf):
    keys = [p.key for p in path if hasattr(p, "key")]
    if len(keys) >= 2 and keys[-1] in ("scale", "bias") and _is_bn_path(stats, keys[:-1]):
      key = _path_key(rng, path)
      lo, hi = (0.5, 1.5) if keys[-1] == "scale" else (-0.2, 0.2)
      return jax.random.uniform(key, leaf.shape, leaf.dtype, lo, hi)
    return leaf

  params = jax.tree_util.tree_map_with_path(perturb_bn_params, variables["params"])
  return {**variables, "params": params, "batch_stats": stats}


def _is_bn_path(stats, keys) -> bool:
  node = stats
  for k in keys:
    if not isinstance(node, dict) or k not in node:
      return False
    node = node[k]
  return isinstance(node, dict) and "mean" in node


def fuse_agreement(name: str, resolution: int, seed: int = 0) -> float:
  """max |logits(fused) - logits(unfused)| with random weights and random BN statistics."""
  model = create_model(name)
  x = jax.random.normal(jax.random.PRNGKey(seed + 1), (2, resolution, resolution, 3))
  variables = model.init(jax.random.PRNGKey(seed), x, train=False)
  variables = randomize_batch_stats(variables, jax.random.PRNGKey(seed + 2))
  fused_model, fused_vars = fuse(model, variables)
  y = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  yf = jax.jit(lambda v, x: fused_model.apply(v, x, train=False))(fused_vars, x)
  return float(jnp.max(jnp.abs(y - yf)))


def zoo_table(pattern: str = "*", fuse_resolution: int = 64, check_fuse: bool = True) -> list[dict]:
  names = list_models(pattern)
  if not names:
    raise ValueError(f"no registered model matches {pattern!r}")
  rows = []
  for name in tqdm(names, desc="zoo", unit="model"):
    info = model_info(name)
    p = profile(name)
    row = {"model": name, "family": info.family, "resolution": info.default_resolution,
           "params": p["params"], "gmacs": p["macs"] / 1e9, "fused_params": None,
           "fused_gmacs": None, "fuse_max_abs_diff": None}
    cfg = info.pretrained_cfg
    row.update(crop_pct=cfg and cfg.crop_pct, interpolation=cfg and cfg.interpolation,
               input_convention=info.input_convention, top1=cfg and cfg.top1,
               latency_ms=cfg.latency_ms[0] if cfg and cfg.latency_ms else None)
    if can_fuse(name):
      model = create_model(name)
      fm, fv = _abstract_fuse(model, abstract_variables(model, info.default_resolution))
      fp = profile(fm, info.default_resolution, variables=fv)
      row["fused_params"], row["fused_gmacs"] = fp["params"], fp["macs"] / 1e9
      if check_fuse:
        row["fuse_max_abs_diff"] = fuse_agreement(name, fuse_resolution)
    rows.append(row)
  return rows


def _abstract_fuse(model, abstract):
  """Fuse shape-only variables: run the fuser on zeros (cheap) to learn the fused structure."""
  zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  fused_model, fused_vars = fuse(model, zeros)
  return fused_model, jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype),
                                             fused_vars)


def format_table(rows: list[dict]) -> str:
  header = (f"{'model':<24}{'family':<14}{'res':>5}{'params':>14}{'GMACs':>9}{'fused params':>15}"
            f"{'fused GMACs':>13}{'fuse max|d|':>13}  {'eval (pretrained_cfg)':<28}"
            f"{'top-1':>6}{'ms':>7}")
  lines = [header, "-" * len(header)]
  for r in rows:
    fp = f"{r['fused_params']:,}" if r["fused_params"] is not None else "-"
    fg = f"{r['fused_gmacs']:.3f}" if r["fused_gmacs"] is not None else "-"
    fd = f"{r['fuse_max_abs_diff']:.1e}" if r["fuse_max_abs_diff"] is not None else "-"
    ev = (f"crop {r['crop_pct']:.3f} {r['interpolation']} {r['input_convention']}"
          if r["crop_pct"] is not None else "-")
    top1 = f"{r['top1']:.1f}" if r["top1"] is not None else "-"
    ms = f"{r['latency_ms']:g}" if r["latency_ms"] is not None else "-"
    lines.append(f"{r['model']:<24}{r['family']:<14}{r['resolution']:>5}{r['params']:>14,}"
                 f"{r['gmacs']:>9.3f}{fp:>15}{fg:>13}{fd:>13}  {ev:<28}{top1:>6}{ms:>7}")
  return "\n".join(lines)
