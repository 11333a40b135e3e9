"""The grain backend (data.backend='grain'): determinism, the global layout (disjoint host slices
covering every example once per epoch; DeiT's RASampler and cvnets' variable batches), eval equal
to the tf.data backend's, the iterator state through the orbax handler (2 processes -> 1), and a
trainer run interrupted after a checkpoint and resumed bitwise equal to an uninterrupted one.

All on a digits build in ArrayRecord format (1,437 train / 360 validation JPEGs)."""
import json

import jax
import numpy as np
import pytest

from mobilevis_jax import data
from mobilevis_jax.data import grain_pipeline as gp
from mobilevis_jax.data import pipeline, sources
from tests.data.conftest import data_cfg

N_TRAIN = 1437


@pytest.fixture(scope="module")
def digits_ar(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds_digits_array_record"))
  sources.prepare("mobilevis_digits", data_dir=d, file_format="array_record")
  return d


def _cfg(data_dir, **kw):
  return data_cfg("mobilevis_digits", data_dir, **{"backend": "grain",
                                                   "file_format": "array_record", **kw})


def _train(cfg, *, batch=16, seed=0, host=0, hosts=1, devices=None, start_step=0):
  return gp.train_iterator(cfg, global_batch_size=batch, seed=seed, start_step=start_step,
                           process_index=host, process_count=hosts,
                           num_devices=hosts if devices is None else devices)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _records(it, step):
  """The record indices (into the train split) a host reads at ``step``."""
  lay = it._layout
  out = []
  for slot in range(lay.step_size(step)):
    epoch, pos, _ = lay.example(step, slot)
    out.append(int(it._perm(epoch)[pos]))
  return out


def test_deterministic_for_a_seed_and_resumable_by_state(digits_ar):
  cfg = _cfg(digits_ar, randaugment="rand-m9-mstd0.5-inc1", random_erasing=0.25)
  a = _take(_train(cfg), 3)
  assert a[0]["image"].shape == (16, 32, 32, 3) and a[0]["image"].dtype == np.float32
  assert a[0]["label"].dtype == np.int32 and set(a[0]["label"]) <= set(range(10))
  b = _take(_train(cfg), 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert not np.array_equal(next(_train(cfg, seed=1))["image"], a[0]["image"])
  # The state after 2 steps, set on a fresh iterator, yields step 2 bit for bit; start_step too.
  it = _train(cfg)
  _take(it, 2)
  state = it.get_state()
  assert state["step"] == 2 and json.loads(json.dumps(state)) == state
  fresh = _train(cfg)
  fresh.set_state(state)
  np.testing.assert_array_equal(next(fresh)["image"], a[2]["image"])
  np.testing.assert_array_equal(next(_train(cfg, start_step=2))["image"], a[2]["image"])


def test_hosts_are_disjoint_slices_covering_every_example_once_per_epoch(digits_ar):
  cfg = _cfg(digits_ar)
  batch, hosts = 30, 3
  its = [_train(cfg, batch=batch, host=h, hosts=hosts) for h in range(hosts)]
  steps = -(-2 * N_TRAIN // batch)  # two epochs
  glob = []
  for s in range(steps):
    per_host = [_records(it, s) for it in its]
    assert all(len(r) == batch // hosts for r in per_host)
    glob += sum(per_host, [])  # the global batch: host slices in process order
  for e in range(2):
    epoch = glob[e * N_TRAIN:(e + 1) * N_TRAIN]
    assert sorted(epoch) == list(range(N_TRAIN))  # each example exactly once per epoch
  assert glob[:N_TRAIN] != glob[N_TRAIN:2 * N_TRAIN]  # reshuffled each epoch
  # The images are those records: 3 hosts' batches concatenated == the one-host batch.
  one = _take(_train(cfg, batch=batch), 2)
  for s in range(2):
    cat = np.concatenate([next(it)["image"] for it in its])
    np.testing.assert_array_equal(cat, one[s]["image"])


def test_repeated_aug_is_deits_rasampler_over_all_devices(digits_ar):
  cfg = _cfg(digits_ar, repeated_aug=3)
  batch, devices, k = 32, 4, 3
  kept, steps = pipeline.repeated_aug_epoch(N_TRAIN, batch, devices)
  its = [_train(cfg, batch=batch, host=h, hosts=2, devices=devices) for h in range(2)]
  perm = [int(its[0]._perm(0)[i]) for i in range(N_TRAIN)]
  rep = [x for x in perm for _ in range(k)]   # DeiT: each index k times, then replica r takes r::D
  per_device = batch // devices
  for s in (0, 1, steps - 1):
    glob = _records(its[0], s) + _records(its[1], s)
    want = []
    for r in range(devices):
      mine = rep[r::devices][:kept]
      want += mine[s * per_device:(s + 1) * per_device]
    assert glob == want, s
  assert _records(its[0], steps) != _records(its[0], 0)  # epoch 1: a new permutation
  # The k copies of an image get their own augmentation.
  aug = _cfg(digits_ar, repeated_aug=3, hflip=0.5, randaugment="rand-m9-mstd0.5-inc1")
  img = next(_train(aug, batch=batch, devices=devices))["image"]
  assert not np.array_equal(img[0], img[per_device])  # device 0 and 1, slot 0: one image


def test_variable_batch_follows_the_schedule_and_cvnets_layout(digits_ar):
  cfg = _cfg(digits_ar, multi_scale=(16, 24, 32, 40))
  batch, devices = 32, 2
  sched = pipeline.train_schedule(cfg, num_examples=N_TRAIN, global_batch_size=batch,
                                  num_devices=devices, seed=0, num_epochs=2)
  it = _train(cfg, batch=batch, devices=devices)
  first = sched.epoch_steps[0]
  for s in list(range(3)) + [first - 1, first]:
    if s != it.step:
      it.set_state({**it.get_state(), "step": s})
    x = next(it)
    r, b = int(sched.resolution[s]), int(sched.global_batch[s])
    assert x["image"].shape == (b, r, r, 3), s
  # One epoch over both hosts: every example at least once, the wrap-around pads only the end.
  hosts = [_train(cfg, batch=batch, host=h, hosts=2, devices=devices) for h in range(2)]
  seen = sum((_records(h, s) for h in hosts for s in range(first)), [])
  share = -(-N_TRAIN // devices)
  assert sorted(set(seen)) == list(range(N_TRAIN)) and len(seen) >= devices * share


def test_eval_matches_the_tfdata_backend(digits_ar):
  cfg = _cfg(digits_ar)
  for host, hosts in ((0, 1), (1, 2)):
    g = list(gp.eval_iterator(cfg, global_batch_size=64, process_index=host, process_count=hosts))
    t = list(pipeline.eval_iterator(cfg, global_batch_size=64, process_index=host,
                                    process_count=hosts))
    assert len(g) == len(t) and g[-1]["mask"].sum() == t[-1]["mask"].sum()
    for a, b in zip(g, t):
      assert a.keys() == b.keys() and a["image"].dtype == b["image"].dtype == np.float32
      np.testing.assert_array_equal(a["label"], b["label"])
      np.testing.assert_array_equal(a["mask"], b["mask"])
      np.testing.assert_allclose(a["image"], b["image"], atol=1e-6)


def test_state_of_two_processes_restores_onto_one(digits_ar, tmp_path, monkeypatch):
  cfg = _cfg(digits_ar, randaugment="rand-m9-mstd0.5-inc1")
  two = [_train(cfg, batch=16, host=h, hosts=2, devices=2) for h in range(2)]
  for it in two:
    _take(it, 3)
  states = [it.get_state() for it in two]
  assert states[0] == states[1]  # one global state, as grain's ElasticIterator
  handler = gp.IteratorStateHandler()
  for h, it in enumerate(two):  # each process writes its own file, as grain's handler
    monkeypatch.setattr(jax, "process_index", lambda h=h: h)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    handler.save(tmp_path, args=it.checkpoint_save_args())
  monkeypatch.undo()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["process_0-of-2.json",
                                                        "process_1-of-2.json"]
  one = _train(cfg, batch=16, devices=2)  # 1 process feeding both devices
  handler.restore(tmp_path, args=gp.IteratorRestore(one))
  assert one.step == 3
  # Nothing replayed, nothing skipped: the global batches go on as the 2-process run's.
  for _ in range(2):
    np.testing.assert_array_equal(next(one)["image"],
                                  np.concatenate([next(it)["image"] for it in two]))
  # A state of another data stream is refused, naming the field.
  for field, value in (("dataset", "imagenet2012/5.1.0:train:0"), ("seed", 1),
                       ("global_batch_size", 32)):
    with pytest.raises(ValueError, match=field):
      one.set_state({**states[0], field: value})
  with pytest.raises(ValueError, match="grain train iterator state"):
    one.set_state({"step": 3})


def test_bad_configs(digits_ar, tmp_path):
  with pytest.raises(ValueError, match="data.backend"):
    data.validate_data_config(_cfg(digits_ar, backend="torch"))
  with pytest.raises(ValueError, match="file_format='array_record'"):
    data.validate_data_config(_cfg(digits_ar, file_format="tfrecord"))
  tfrecord = str(tmp_path / "tfrecord")
  sources.prepare("mobilevis_digits", data_dir=tfrecord)
  with pytest.raises(ValueError, match="--file-format array_record"):
    _train(_cfg(tfrecord))
  assert data.get_source("mobilevis_digits", "grain") is gp
  assert data.get_source("mobilevis_digits") is pipeline


# ----------------------------------------------------------------------------- trainer


class _Interrupted(Exception):
  pass


def _trainer_cfg(data_dir):
  from tests.train import tiny_config
  cfg = tiny_config.get_config()
  cfg.data = _cfg(data_dir, image_size=16, randaugment="rand-m9-mstd0.5-inc1")
  cfg.num_train_steps = 12
  cfg.checkpoint_every_steps = 4
  cfg.eval_batch_size = 120
  return cfg


def test_trainer_interrupted_and_resumed_equals_uninterrupted(digits_ar, tmp_path):
  from mobilevis_jax.train import checkpoint as ckpt_lib
  from mobilevis_jax.train import train

  cfg = _trainer_cfg(digits_ar)
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  train.train_and_evaluate(cfg, str(straight))

  def die(step):
    if step == 10:  # after the step-8 checkpoint; the iterator has read ahead (prefetch)
      raise _Interrupted
  with pytest.raises(_Interrupted):
    train.train_and_evaluate(cfg, str(killed), on_step=die)
  saved = json.loads((killed / "checkpoints" / "8" / "data" / "process_0-of-1.json").read_text())
  assert saved["step"] == 8 and saved["sampler"] == "stream"
  result = train.train_and_evaluate(cfg, str(killed))
  assert result["step"] == 12
  a, meta_a = ckpt_lib.restore_variables(str(straight))
  b, meta_b = ckpt_lib.restore_variables(str(killed))
  assert meta_a["step"] == meta_b["step"] == 12
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # A checkpoint whose iterator state belongs to another data stream is an error, not a
  # silent restart or fall-back.
  path = killed / "checkpoints" / "12" / "data" / "process_0-of-1.json"
  path.write_text(json.dumps({**saved, "step": 12, "dataset": "imagenet2012/5.1.0:train:0"}))
  cfg.num_train_steps = 14
  with pytest.raises(ValueError, match="dataset="):
    train.train_and_evaluate(cfg, str(killed))


def test_corrupt_record_error_names_the_file_or_counted_substitution(tmp_path):
  from mobilevis_jax.data import fake_archives
  manual, d = str(tmp_path / "manual"), str(tmp_path / "tfds")
  fake_archives.write_ilsvrc2012(manual, images_per_class=2, num_val=2,
                                 corrupt_train_file="n01440764_2.JPEG")
  sources.prepare("imagenet2012", data_dir=d, manual_dir=manual, file_format="array_record")
  cfg = data_cfg("imagenet2012", d, backend="grain", file_format="array_record", image_size=16)
  with pytest.raises(data.CorruptImageError, match="n01440764_2.JPEG"):
    _take(_train(cfg, batch=2), 3)  # 6 records: one epoch
  cfg.skip_corrupt = True
  it = _train(cfg, batch=2)
  batches = _take(it, 6)  # 2 epochs, every step full: the bad record's slot takes the next one
  assert all(b["image"].shape == (2, 16, 16, 3) for b in batches)
  assert it.skipped_corrupt == 1
  again = _take(_train(cfg, batch=2, start_step=4), 2)  # the substitution is a pure function
  for x, y in zip(batches[4:], again):
    np.testing.assert_array_equal(x["image"], y["image"])


def test_trainer_two_processes_resume_on_one(digits_ar, tmp_path):
  """jax.distributed with 2 processes x 1 device to step 8, then 1 process x 2 devices to step
  12 from that checkpoint (the grain state of process_<i>-of-2.json), against 1 x 2 straight."""
  import os
  import socket
  import subprocess
  import sys

  from mobilevis_jax.train import checkpoint as ckpt_lib
  root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
  worker = os.path.join(root, "tests", "train", "worker.py")
  flags = ["--config", os.path.join(root, "tests", "train", "tiny_config.py"),
           "--config.data.name=mobilevis_digits", f"--config.data.data_dir={digits_ar}",
           "--config.data.backend=grain", "--config.data.file_format=array_record",
           "--config.optimizer.schedule=constant", "--config.optimizer.warmup_steps=0",
           "--config.checkpoint_every_steps=4", "--config.eval_batch_size=120"]

  def env(**extra):
    e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
    e.pop("XLA_FLAGS", None)
    e.update(extra)
    return e

  def run(workdir, steps, **extra):
    return subprocess.Popen([sys.executable, worker, "train", *flags, "--workdir", str(workdir),
                             f"--config.num_train_steps={steps}"], env=env(**extra),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

  two_devices = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  ref = run(tmp_path / "straight", 12, **two_devices)
  multi = [run(tmp_path / "elastic", 8, MOBILEVIS_COORDINATOR_ADDRESS=f"localhost:{port}",
               MOBILEVIS_NUM_PROCESSES="2", MOBILEVIS_PROCESS_ID=str(pid)) for pid in range(2)]
  for p in multi + [ref]:
    out = p.communicate(timeout=900)[0]
    assert p.returncode == 0, out
  saved = sorted(f for f in os.listdir(tmp_path / "elastic" / "checkpoints" / "8" / "data")
                 if f.endswith(".json"))
  assert saved == ["process_0-of-2.json", "process_1-of-2.json"]
  one = run(tmp_path / "elastic", 12, **two_devices)
  out = one.communicate(timeout=900)[0]
  assert one.returncode == 0 and "resumed from step 8" in out, out
  a, meta_a = ckpt_lib.restore_variables(str(tmp_path / "straight"))
  b, meta_b = ckpt_lib.restore_variables(str(tmp_path / "elastic"))
  assert meta_a["step"] == meta_b["step"] == 12
  # The same global batches at every step: equal up to the cross-process reduction order (as
  # tests/train/test_parallel.py); replayed or skipped data would move them by ~the lr.
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
