"""Work directories on a non-local filesystem: a ``gs://`` run trains, checkpoints, logs and resumes.

The bucket is a Google Cloud Storage emulator (`gcp-storage-emulator`, in memory, on a local port),
so the whole GCS protocol runs offline: orbax writes the checkpoint arrays through TensorStore's
GCS client (pointed at the emulator by ``TENSORSTORE_GCS_HTTP_URL``), everything else
(`mobilevis_jax.fs`, orbax's metadata, the logs) goes through etils.epath. epath would hand a
``gs://`` path to TensorFlow's GCS client when TensorFlow is installed, and that client has no
endpoint override; the tests therefore route epath through its fsspec backend (gcsfs, which honours
``STORAGE_EMULATOR_HOST``), the backend epath uses where TensorFlow is absent. The package's code
is the same for either backend: it only calls epath.
"""

from __future__ import annotations

import glob
import json
import os

import jax
import numpy as np
import pytest

from mobilevis_jax import fs
from mobilevis_jax.train import best as best_lib
from mobilevis_jax.train import checkpoint as ckpt_lib
from mobilevis_jax.train import metrics_log, train
from tests.train import tiny_config

BUCKET = 'mobilevis-test'


@pytest.fixture(scope='module')
def gcs():
  """A fresh in-memory GCS emulator (tests/gcs_emulator.py); yields the bucket's ``gs://`` root."""
  pytest.importorskip('gcsfs', reason='the [test] extra installs gcsfs')
  pytest.importorskip('gcp_storage_emulator', reason='the [test] extra installs it')
  from tests import gcs_emulator
  url, stop = gcs_emulator.start(BUCKET)
  import etils.epath.gpath as gpath
  try:
    with pytest.MonkeyPatch.context() as mp:
      mp.setenv('STORAGE_EMULATOR_HOST', url)   # gcsfs (epath's fsspec backend)
      mp.setenv('TENSORSTORE_GCS_HTTP_URL', url)  # TensorStore (orbax's arrays)
      mp.setattr(gpath, '_is_tf_installed', lambda: False)  # see the module docstring
      import fsspec
      fsspec.filesystem('gs').clear_instance_cache()  # gcsfs reads the endpoint when created
      yield f'gs://{BUCKET}'
  finally:
    stop()


def _gcsfs():
  import fsspec
  return fsspec.filesystem('gs')


# ------------------------------------------------------------------------------------------------
# The path layer
# ------------------------------------------------------------------------------------------------

def test_resolve_keeps_uris_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert os.fspath(fs.resolve('run')) == str(tmp_path / 'run')
  assert fs.join('gs://b/run', 'checkpoints') == 'gs://b/run/checkpoints'
  assert fs.is_remote('gs://b/x') and not fs.is_remote(str(tmp_path))
  with pytest.raises(ValueError, match='empty'):
    fs.resolve('')
  fs.check_output_dir(tmp_path / 'out.onnx')  # its directory exists
  fs.check_output_dir('gs://b/no/such/prefix/out.onnx')  # object stores have no directories
  with pytest.raises(FileNotFoundError, match='output directory .*missing does not exist'):
    fs.check_output_dir(tmp_path / 'missing' / 'out.onnx')


def test_files_on_the_bucket(gcs, tmp_path):
  root = f'{gcs}/fs'
  fs.makedirs(root)
  fs.write_text_atomic(f'{root}/a.json', '{"x": 1}')
  assert json.loads(fs.read_text(f'{root}/a.json')) == {'x': 1}
  fs.write_bytes_atomic(f'{root}/a.json', b'{"x": 2}')  # replaces the object
  assert fs.read_bytes(f'{root}/a.json') == b'{"x": 2}'
  # An append-only log: nothing new reaches the object before a flush is due, everything after.
  log = fs.AppendFile(f'{root}/log.txt', flush_secs=3600)
  log.write('one\n')
  assert not fs.exists(f'{root}/log.txt')
  log.flush()
  assert fs.read_text(f'{root}/log.txt') == 'one\n'
  log.write('two\n')
  log.close()
  assert fs.read_text(f'{root}/log.txt') == 'one\ntwo\n'
  with pytest.raises(ValueError, match='closed'):
    log.write('three\n')
  again = fs.AppendFile(f'{root}/log.txt', flush_secs=0)  # reopened: keeps what was there
  again.write('three\n')
  assert fs.read_text(f'{root}/log.txt') == 'one\ntwo\nthree\n'
  again.close()
  # Outputs of libraries that write only local files, and the way back.
  with fs.local_output(f'{root}/out.bin') as local:
    assert not fs.is_remote(local)
    with open(local, 'wb') as f:
      f.write(b'payload')
  with fs.local_input(f'{root}/out.bin') as local:
    assert open(local, 'rb').read() == b'payload'
  with pytest.raises(RuntimeError), fs.local_output(f'{root}/failed.bin') as local:
    open(local, 'wb').write(b'half')
    raise RuntimeError('the writer failed')
  assert not fs.exists(f'{root}/failed.bin')  # nothing uploaded for a failed write
  with pytest.raises(FileNotFoundError), fs.local_input(f'{root}/missing.bin'):
    pass
  # A directory a library built locally (a Core ML package), uploaded over an older one.
  tree = tmp_path / 'pkg.mlpackage'
  (tree / 'Data' / 'weights').mkdir(parents=True)
  (tree / 'Manifest.json').write_text('{}')
  (tree / 'Data' / 'weights' / 'w.bin').write_bytes(b'\x00\x01')
  fs.write_text_atomic(f'{root}/pkg.mlpackage/stale.txt', 'from an older export')
  fs.upload_tree(tree, f'{root}/pkg.mlpackage')
  assert fs.read_bytes(f'{root}/pkg.mlpackage/Data/weights/w.bin') == b'\x00\x01'
  assert fs.read_text(f'{root}/pkg.mlpackage/Manifest.json') == '{}'
  assert not fs.exists(f'{root}/pkg.mlpackage/stale.txt')
  fs.rmtree(root)
  assert not fs.exists(f'{root}/a.json') and not fs.exists(f'{root}/log.txt')
  fs.rmtree(root)  # nothing left to remove: no error


def test_append_file_locally_writes_through(tmp_path):
  log = fs.AppendFile(tmp_path / 'log.txt')
  log.write('one\n')
  assert (tmp_path / 'log.txt').read_text() == 'one\n'  # line-buffered: there at once
  log.close()
  log = fs.AppendFile(tmp_path / 'log.txt')
  log.write('two\n')
  log.close()
  assert (tmp_path / 'log.txt').read_text() == 'one\ntwo\n'


# ------------------------------------------------------------------------------------------------
# TensorBoard event files, written without tf.summary
# ------------------------------------------------------------------------------------------------

def test_crc32c_known_value():
  assert metrics_log.crc32c(b'123456789') == 0xE3069283  # the CRC-32C check value
  assert metrics_log.crc32c(b'') == 0


def _read_events(path):
  import tensorflow as tf
  out = []
  for e in tf.compat.v1.train.summary_iterator(path):
    out.append((e.step, e.file_version, {v.tag: v.simple_value for v in e.summary.value}))
  return out


def test_event_file_is_what_tensorflow_reads(tmp_path):
  writer = metrics_log.MetricWriter(str(tmp_path))
  writer.write(4, {'train/loss': 2.5, 'train/lr': 0.125})
  writer.write(8, {'eval/top1': 0.75})
  writer.close()
  files = glob.glob(str(tmp_path / 'tensorboard' / 'events.out.tfevents.*'))
  assert len(files) == 1
  events = _read_events(files[0])
  assert events == [(0, 'brain.Event:2', {}), (4, '', {'train/loss': 2.5, 'train/lr': 0.125}),
                    (8, '', {'eval/top1': 0.75})]
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [4, 8] and rows[0]['train/loss'] == 2.5
  # The reader checks the framing's checksums: a flipped byte in the data is refused.
  data = bytearray(open(files[0], 'rb').read())
  data[-6] ^= 0xFF
  open(files[0], 'wb').write(bytes(data))
  import tensorflow as tf
  with pytest.raises(tf.errors.DataLossError):
    _read_events(files[0])


# ------------------------------------------------------------------------------------------------
# A whole run in a gs:// work directory
# ------------------------------------------------------------------------------------------------

def _cfg():
  cfg = tiny_config.get_config()
  cfg.num_train_steps = 8
  cfg.checkpoint_every_steps = 4
  cfg.eval_every_epochs = 4 / 32  # every 4 steps (32 steps per epoch)
  cfg.keep_best_ema = 2
  cfg.tensorboard = True
  return cfg


def test_gs_workdir_trains_checkpoints_and_resumes(gcs, tmp_path, capsys):
  local = str(tmp_path / 'local')
  remote = f'{gcs}/run'
  train.train_and_evaluate(_cfg(), local)
  first = train.train_and_evaluate(_cfg(), remote)
  assert first['step'] == 8
  assert ckpt_lib.TrainCheckpointer(remote, use_async=False).all_steps() == [4, 8]
  # Lose the newest checkpoint (as a preempted run that never wrote it), then run again: the
  # run resumes from step 4 on the bucket and ends where the uninterrupted local run ended.
  fs.rmtree(f'{remote}/checkpoints/8')
  _gcsfs().invalidate_cache()
  capsys.readouterr()
  again = train.train_and_evaluate(_cfg(), remote)
  assert 'resumed from step 4' in capsys.readouterr().out
  assert again['step'] == 8 and again['eval/top1'] == first['eval/top1']
  a, meta_a = ckpt_lib.restore_variables(local)
  b, meta_b = ckpt_lib.restore_variables(remote)
  assert meta_a['step'] == meta_b['step'] == 8
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  # Logs: metrics.jsonl holds both sessions (steps 4, 8, then 8 again after the resume).
  rows = [json.loads(line) for line in fs.read_text(f'{remote}/metrics.jsonl').splitlines()]
  assert [r['step'] for r in rows if 'train/loss' in r] == [4, 8, 8]
  assert any('eval/top1' in r for r in rows)
  # One TensorBoard event file per session, each readable by TensorFlow.
  events = sorted(p.name for p in fs.resolve(f'{remote}/tensorboard').iterdir())
  assert len(events) == 2 and all(e.startswith('events.out.tfevents.') for e in events)
  for i, name in enumerate(events):
    with fs.local_input(f'{remote}/tensorboard/{name}') as path:
      steps = {step for step, _, values in _read_events(path) if 'train/loss' in values}
    assert steps == ({4, 8} if i == 0 else {8})

  # Best evaluations, their top-2 EMA copies, and averaging them onto the bucket.
  record = json.loads(fs.read_text(f'{remote}/best/best.json'))
  assert {'raw', 'ema'} <= set(record) and len(record['ema_top']) == 2
  paths = best_lib.best_ema_checkpoints(remote, 2)
  assert all(p.startswith(f'{remote}/best/ema_top/') for p in paths)
  meta = best_lib.average_checkpoints(paths, f'{gcs}/averaged')
  assert meta['model_name'] == 'trainer_test_tiny_cnn'
  averaged, _ = ckpt_lib.restore_variables(f'{gcs}/averaged')
  parts = [ckpt_lib.restore_variables(p)[0] for p in paths]
  for m, x, y in zip(jax.tree.leaves(averaged), *map(jax.tree.leaves, parts), strict=True):
    np.testing.assert_allclose(np.asarray(m), (np.asarray(x, np.float64) + np.asarray(y)) / 2,
                               rtol=1e-6, atol=1e-7)


def test_weight_files_on_the_bucket(gcs):
  from mobilevis_jax.interop import deploy, io
  sd = {'conv.weight': np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
        'bn.num_batches_tracked': np.asarray(7, np.int64)}
  io.save_state_dict(sd, f'{gcs}/w/model.safetensors', metadata={'model': 'x'})
  back = io.load_state_dict(f'{gcs}/w/model.safetensors')
  assert io.read_metadata(f'{gcs}/w/model.safetensors') == {'model': 'x'}
  assert sorted(back) == sorted(sd)
  np.testing.assert_array_equal(back['conv.weight'], sd['conv.weight'])
  pytest.importorskip('torch')
  io.save_state_dict(sd, f'{gcs}/w/model.pth', metadata={'model': 'y'})
  assert io.read_metadata(f'{gcs}/w/model.pth') == {'model': 'y'}
  np.testing.assert_array_equal(io.load_state_dict(f'{gcs}/w/model.pth')['conv.weight'],
                                sd['conv.weight'])
  with pytest.raises(FileNotFoundError):
    io.load_state_dict(f'{gcs}/w/missing.safetensors')
  # `create_model(pretrained=URI)` reads a weight file from the bucket.
  import mobilevis_jax
  from mobilevis_jax.interop import to_torch_state_dict
  from mobilevis_jax.latency import random_variables
  variables = random_variables('regnety_002', 32)
  io.save_state_dict(to_torch_state_dict('regnety_002', variables, layout='timm'),
                     f'{gcs}/w/regnety_002.safetensors')
  _, loaded = mobilevis_jax.create_model(
      'regnety_002', pretrained=f'{gcs}/w/regnety_002.safetensors').unbind()
  for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Export paths on a bucket are checked for their suffix only (no directories to check).
  assert deploy.check_output_path(f'{gcs}/exports/m.onnx', '.onnx') == f'{gcs}/exports/m.onnx'
  with pytest.raises(ValueError, match='must end in .onnx'):
    deploy.check_output_path(f'{gcs}/exports/m.tflite', '.onnx')


def test_export_to_the_bucket(gcs, tmp_path):
  """`export_torch` (a library that writes local files only, staged and uploaded) to a gs://
  path gives the same file as a local export."""
  pytest.importorskip('torch')
  from mobilevis_jax import interop, torch_models
  from mobilevis_jax.interop.export import check_torch_output_path
  from mobilevis_jax.latency import random_variables
  variables = random_variables('regnety_002', 32)
  local = tmp_path / 'm.safetensors'
  interop.export_torch('regnety_002', variables, local, resolution=32)
  header = interop.export_torch('regnety_002', variables, f'{gcs}/exports/m.safetensors',
                                resolution=32)
  assert header['model'] == 'regnety_002'
  with fs.local_input(f'{gcs}/exports/m.safetensors') as path:
    module = torch_models.load(path)
  reference = torch_models.load(local)
  for (ka, a), (kb, b) in zip(module.state_dict().items(), reference.state_dict().items(),
                              strict=True):
    assert ka == kb and bool((a == b).all()), ka
  with pytest.raises(ValueError, match='.safetensors'):
    check_torch_output_path(f'{gcs}/exports/m.pt')
