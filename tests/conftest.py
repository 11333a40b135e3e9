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
