"""Shared test configuration: keep JAX on the CPU and deterministic."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# torchvision/timm load triton's native library; loading it *after* TensorFlow crashes the process
# (seen with tensorflow-cpu 2.21 + torch 2.14), so load it first whatever order the tests import in.
import importlib.util  # noqa: E402

if importlib.util.find_spec("triton"):
  import triton._C.libtriton  # noqa: F401,E402


def pytest_collection_modifyitems(config, items):
  """Grouped tests first. An ``xdist_group`` is one work unit for ``--dist loadgroup`` (the recipe
  test's worker runs every recipe in one process, ~20 min on 2 cores); starting the longest unit
  first lets the other workers share out the rest instead of waiting for it at the end."""
  items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)
