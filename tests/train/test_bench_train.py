"""Smoke run of experiments/bench/bench_train.py --quick (both sides train and a ratio is printed)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))


def test_bench_train_quick():
  pytest.importorskip('torch')
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'experiments/bench/bench_train.py'), '--quick'],
                        capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['jax']['images_per_s'] > 0 and result['torch']['images_per_s'] > 0
  assert result['ratio_jax_over_torch'] == pytest.approx(
      result['jax']['images_per_s'] / result['torch']['images_per_s'])
