"""Checkpoints with orbax: the training state of a run, and model variables on their own.

Training checkpoints live in `<workdir>/checkpoints/<step>/` (an orbax `CheckpointManager`: async
saves, keep-N; `Preemption` says when to save before a kill). Each holds the whole `TrainState`
(parameters, BatchNorm statistics, optimiser state, EMA, step, RNG key) plus a JSON `meta` item
with the data position (the number of global batches consumed, from which the input pipeline
restarts) and the model name and kwargs; with the grain input backend also a `data` item, the
iterator's own state (`data/grain_pipeline.py`: one JSON file per process, restorable onto
another process count). Restoring walks back from the newest step: a step that
fails to restore (truncated or corrupt files, e.g. a run killed while writing) is reported in a
log line and the previous one is used.

Variables checkpoints (`save_variables` / `restore_variables`) hold only `{'params', 'batch_stats'}`
and a `meta.json`; `mobilevis import` writes them, and the trainer reads them for `init_from` and
for a distillation teacher. `restore_variables` also accepts a training work directory.
"""

from __future__ import annotations

import json
import logging
import re
import signal
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mobilevis_jax import fs

log = logging.getLogger(__name__)

_STATE = 'state'
_META = 'meta'
_DATA = 'data'  # the input iterator's own state (grain backend: data/grain_pipeline.py)
_VARIABLES = 'variables'
_META_FILE = 'meta.json'


def checkpoint_dir(workdir: str) -> str:
  """`<workdir>/checkpoints`: absolute for a local path, a URI (``gs://...``) as written."""
  return fs.join(workdir, 'checkpoints')


class TrainCheckpointer:
  """A CheckpointManager over `<workdir>/checkpoints` that restores the newest readable step."""

  def __init__(self, workdir: str, *, keep: int = 3, use_async: bool = True,
               data_handler: Any = None) -> None:
    self.directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async,
                                           create=True)
    handlers = {_STATE: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler()}
    if data_handler is not None:  # an input iterator that checkpoints its own state (grain)
      handlers[_DATA] = data_handler
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False,
           data_args: Any = None) -> bool:
    """Saves `state` and `meta` (and, given `data_args`, the input iterator's state item)."""
    items = {_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta)}
    if data_args is not None:
      items[_DATA] = data_args
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore_data(self, step: int, data_args: Any) -> bool:
    """Restores the input iterator's state item of checkpoint `step` through `data_args`; False
    when that checkpoint has none (e.g. written with the tf.data backend). Outside
    `restore_latest`'s fall-back on purpose: a state of another data stream is a configuration
    error to report, not a damaged checkpoint to skip."""
    if not fs.exists(fs.join(self.directory, str(step), _DATA)):
      return False
    self.manager.restore(step, args=ocp.args.Composite(**{_DATA: data_args}))
    return True

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

  def all_steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict, int] | None:
    """(state, meta, step) of the newest readable checkpoint, or None if there is none.

    `abstract_state` is a tree of jax.ShapeDtypeStruct with shardings (the target layout), so a
    restore lands directly on the devices of the current mesh.
    """
    steps = self.all_steps()
    for i, step in enumerate(reversed(steps)):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore(abstract_state), _META: ocp.args.JsonRestore()}))
        return restored[_STATE], dict(restored[_META]), step
      except Exception as e:
        older = steps[len(steps) - i - 2] if len(steps) - i - 2 >= 0 else None
        msg = (f'checkpoint at step {step} in {self.directory} could not be restored '
               f'({type(e).__name__}: {str(e)[:300]}); ')
        msg += f'falling back to step {older}' if older is not None else 'no older checkpoint left'
        log.warning(msg)
        print('WARNING: ' + msg, flush=True)
    return None


class Preemption:
  """Whether to save and stop now: SIGTERM was received, or orbax saw the preemption signal.

  Schedulers send SIGTERM before a kill; orbax's `reached_preemption` covers the multi-host case
  (all processes agree on the step, through the distributed runtime). Used as a context manager
  around the loop, it installs the SIGTERM handler and restores the previous one on exit.
  """

  def __init__(self, checkpointer: TrainCheckpointer) -> None:
    self._checkpointer = checkpointer
    self.requested = False
    self._previous = None

  def __enter__(self) -> Preemption:
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread (e.g. a notebook worker): rely on orbax only
      self._previous = None
    return self

  def _handler(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def reached(self, step: int) -> bool:
    if self.requested:
      return True
    try:
      return bool(self._checkpointer.manager.reached_preemption(step))
    except Exception:
      # Without a distributed runtime (single process, CPU) there is no preemption service.
      return False


# ------------------------------------------------------------------------------------------------
# Variables-only checkpoints
# ------------------------------------------------------------------------------------------------

def save_variables(directory: str, variables: Any, *, model_name: str,
                   extra: dict | None = None) -> None:
  """Writes `variables` ({'params', 'batch_stats'?}) and meta.json with the model name (+ extra)."""
  fs.makedirs(directory)
  variables = jax.tree.map(lambda x: jax.device_get(x), dict(variables))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(fs.join(directory, _VARIABLES), variables, force=True)
    ckptr.wait_until_finished()
  meta = {'model_name': model_name, **(extra or {})}
  if jax.process_index() == 0:
    fs.write_text_atomic(fs.join(directory, _META_FILE), json.dumps(meta, indent=1, default=str))


def _is_train_workdir(directory: str) -> bool:
  return fs.isdir(checkpoint_dir(directory))


def restore_variables(directory: str) -> tuple[dict, dict]:
  """(variables, meta) from a `save_variables` directory or a training work directory.

  For a work directory, the newest readable training checkpoint's raw (non-EMA) parameters and
  BatchNorm statistics are returned; meta carries model_name, model_kwargs and step.
  """
  if fs.isdir(fs.join(directory, _VARIABLES)):
    with ocp.StandardCheckpointer() as ckptr:
      variables = ckptr.restore(fs.join(directory, _VARIABLES))
    meta_path = fs.join(directory, _META_FILE)
    meta = json.loads(fs.read_text(meta_path)) if fs.exists(meta_path) else {}
    return dict(variables), meta
  if _is_train_workdir(directory):
    ckpt = TrainCheckpointer(directory, use_async=False)
    steps = ckpt.all_steps()
    # Target: the saved shapes, replicated over this process's view of all devices, so a
    # checkpoint written by N processes restores in one (orbax refuses a topology change
    # without an explicit target).
    sharding = NamedSharding(Mesh(np.asarray(jax.devices()), ('data',)), PartitionSpec())
    as_target = lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding)
    for step in reversed(steps):
      try:
        target = jax.tree.map(as_target, ckpt.manager.item_metadata(step)[_STATE])
        restored = ckpt.manager.restore(step, args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore(target), _META: ocp.args.JsonRestore()}))
      except Exception as e:
        log.warning('checkpoint at step %d unreadable (%s); trying an older one', step, e)
        print(f'WARNING: checkpoint at step {step} unreadable ({type(e).__name__}); '
              'trying an older one')
        continue
      state, meta = restored[_STATE], dict(restored[_META])
      variables = {'params': state['params']}
      if state.get('batch_stats'):
        variables['batch_stats'] = state['batch_stats']
      meta['step'] = step
      return variables, meta
    raise FileNotFoundError(f'no readable training checkpoint under {checkpoint_dir(directory)}')
  raise FileNotFoundError(f'{directory} holds neither a variables checkpoint ({_VARIABLES}/) nor a '
                          'training work directory (checkpoints/)')


# ------------------------------------------------------------------------------------------------
# Initialising a model from a variables checkpoint (init_from)
# ------------------------------------------------------------------------------------------------

def _path_string(path) -> str:
  """'/'-joined names of a tree path, e.g. 'features_1/token_mixer/conv/kernel'."""
  return jax.tree_util.keystr(tuple(path), simple=True, separator='/')


def merge_pretrained(fresh: dict, loaded: dict, exclude: Sequence[str] = ()) -> dict:
  """`fresh` variables with every leaf taken from `loaded`, except paths matching `exclude`.

  Any other mismatch (a missing leaf, a leaf of another shape, a leftover loaded leaf) is an error
  naming the paths: a silently partial initialisation is the worst kind of bug in a fine-tune.
  """
  pats = [re.compile(p) for p in exclude]
  excluded = lambda path: any(p.search(path) for p in pats)
  out, problems = {}, []
  for collection, tree in fresh.items():
    out[collection] = _merge_collection(collection, tree, loaded.get(collection, {}), excluded,
                                        problems)
  if problems:
    raise ValueError('init_from does not match the model (use init_exclude for re-initialised '
                     'parts): ' + '; '.join(problems[:20]) + (' ...' if len(problems) > 20 else ''))
  return out


def _merge_collection(collection: str, tree: Any, loaded: Any, excluded: Callable[[str], bool],
                      problems: list[str]) -> Any:
  """One collection of `merge_pretrained`; appends what does not match to `problems`."""
  src = {_path_string(p): v for p, v in jax.tree_util.tree_leaves_with_path(loaded)}
  used = set()

  def pick(path, leaf):
    key = _path_string(path)
    if excluded(key):
      return leaf
    if key not in src:
      problems.append(f'missing {collection}/{key}')
      return leaf
    used.add(key)
    if tuple(np.shape(src[key])) != tuple(np.shape(leaf)):
      problems.append(f'{collection}/{key}: checkpoint {np.shape(src[key])} '
                      f'vs model {np.shape(leaf)}')
      return leaf
    return jnp.asarray(src[key], dtype=leaf.dtype)

  merged = jax.tree_util.tree_map_with_path(pick, tree)
  problems += [f'unexpected {collection}/{k}' for k in src if k not in used and not excluded(k)]
  return merged
