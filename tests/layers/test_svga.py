"""SVGA and the KNN-graph baseline against direct, loop-based references (and PyTorch)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilevis_jax.layers import knn_graph, svga


def svga_loop(x: np.ndarray, k: int) -> np.ndarray:
  """Naive NHWC SVGA aggregation, one output pixel at a time (independent of any roll).

  Pixel (h, w) is connected to rows (h - s) mod H for s = K, 2K, ... < H and to columns
  (w - s) mod W for s = K, 2K, ... < W; the aggregate is max(0, max_j (x_centre - x_j)).
  """
  b, h, w, c = x.shape
  out = np.zeros_like(x)
  for i in range(h):
    for j in range(w):
      neighbours = [x[:, (i - s) % h, j, :] for s in range(k, h, k)]
      neighbours += [x[:, i, (j - s) % w, :] for s in range(k, w, k)]
      best = np.zeros((b, c), x.dtype)
      for nb in neighbours:
        best = np.maximum(best, x[:, i, j, :] - nb)
      out[:, i, j, :] = best
  return out


# Square, non-square, odd, a detection-sized 42x25 map, and degenerate 1- and 2-pixel axes.
CASES = [((7, 7), 2), ((14, 14), 2), ((6, 9), 2), ((42, 25), 2), ((5, 3), 1), ((5, 3), 3),
         ((1, 4), 2), ((2, 2), 2), ((9, 11), 3)]
_jit_svga = jax.jit(svga.svga_aggregate, static_argnums=1)


@pytest.mark.parametrize("size,k", CASES, ids=[f"{h}x{w}-K{k}" for (h, w), k in CASES])
def test_svga_matches_loop(size, k):
  h, w = size
  x = np.random.default_rng(h * 100 + w + k).normal(size=(2, h, w, 5)).astype(np.float32)
  got = np.asarray(_jit_svga(jnp.asarray(x), k))
  np.testing.assert_array_equal(got, svga_loop(x, k))


def test_svga_eager_equals_jit_and_has_gradients():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 9, 6, 4))
  np.testing.assert_array_equal(np.asarray(svga.svga_aggregate(x, 2)), np.asarray(_jit_svga(x, 2)))
  g = jax.jit(jax.grad(lambda x: svga.svga_aggregate(x, 2).sum()))(x)
  assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0


def test_svga_neighbours_of_7x7_wrap_one_way():
  # K=2 on 7 rows: shifts 2, 4, 6, so row 3 meets rows 1, 6 (3-4 mod 7) and 4 (3-6 mod 7).
  nbrs = svga.svga_neighbours(7, 7, 2, 3, 0)
  assert nbrs == [(1, 0), (6, 0), (4, 0), (3, 5), (3, 3), (3, 1)]
  # 42x25: 20 row shifts + 12 column shifts.
  assert len(svga.svga_neighbours(42, 25, 2, 0, 0)) == 32


def test_svga_is_centre_minus_neighbour_not_symmetric():
  x = np.zeros((1, 7, 1, 1), np.float32)
  x[0, 0] = 1.0
  got = np.asarray(svga.svga_aggregate(jnp.asarray(x), 2))[0, :, 0, 0]
  # Only row 0 is larger than one of its neighbours; rows that *see* row 0 get max(0, 0 - 1) = 0.
  np.testing.assert_array_equal(got, [1, 0, 0, 0, 0, 0, 0])


def test_svga_rejects_bad_input():
  with pytest.raises(ValueError, match="NHWC"):
    svga.svga_aggregate(jnp.zeros((4, 4, 3)), 2)
  with pytest.raises(ValueError, match="positive int"):
    svga.svga_aggregate(jnp.zeros((1, 4, 4, 3)), 0)


def test_mrconv4d_matches_torch_block_concat():
  torch = pytest.importorskip("torch")
  from mobilevis_jax.torch_models.mobilevig import RefMRConv4d
  from tests.helpers import randomize_mobilevig_
  c, h, w = 6, 5, 8
  x = np.random.default_rng(0).normal(size=(2, h, w, c)).astype(np.float32)
  ref = randomize_mobilevig_(RefMRConv4d(c, 2)).eval()
  conv, bn = ref.nn[0], ref.nn[1]
  variables = {
      "params": {"conv": {"kernel": jnp.asarray(conv.weight.detach().numpy().transpose(2, 3, 1, 0)),
                          "bias": jnp.asarray(conv.bias.detach().numpy())},
                 "bn": {"scale": jnp.asarray(bn.weight.detach().numpy()),
                        "bias": jnp.asarray(bn.bias.detach().numpy())}},
      "batch_stats": {"bn": {"mean": jnp.asarray(bn.running_mean.numpy()),
                             "var": jnp.asarray(bn.running_var.numpy())}}}
  got = svga.MRConv4d(k=2).apply(variables, jnp.asarray(x), False)
  with torch.no_grad():
    want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def _knn_brute_force(x, k, dilation, ratio):
  """Plain numpy ViG graph: normalise, all distances, sort, every d-th, gather, max(x_j - x_i)."""
  b, h, w, c = x.shape
  keys = x.reshape(b, h // ratio, ratio, w // ratio, ratio, c).mean(axis=(2, 4)).reshape(b, -1, c)
  q = x.reshape(b, h * w, c)
  qn = q / np.linalg.norm(q, axis=-1, keepdims=True)
  kn = keys / np.linalg.norm(keys, axis=-1, keepdims=True)
  out = np.zeros_like(q)
  for bi in range(b):
    for n in range(h * w):
      d = ((qn[bi, n] - kn[bi]) ** 2).sum(-1)
      idx = np.argsort(d, kind="stable")[:k * dilation:dilation]
      out[bi, n] = (keys[bi, idx] - q[bi, n]).max(axis=0)
  return out.reshape(b, h, w, c)


@pytest.mark.parametrize("k,dilation,ratio", [(9, 1, 1), (4, 2, 1), (3, 1, 2)])
def test_knn_aggregate_matches_brute_force(k, dilation, ratio):
  x = np.random.default_rng(k).normal(size=(2, 6, 8, 4)).astype(np.float32)
  got = np.asarray(jax.jit(knn_graph.knn_aggregate, static_argnums=(1, 2, 3))(
      jnp.asarray(x), k, dilation, ratio))
  np.testing.assert_allclose(got, _knn_brute_force(x, k, dilation, ratio), atol=1e-5)


def test_knn_graph_nearest_key_is_self():
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 5, 5, 16))
  idx = np.asarray(jax.jit(knn_graph.knn_indices, static_argnums=1)(x, 3))
  np.testing.assert_array_equal(idx[0, :, 0], np.arange(25))


def test_knn_rejects_too_many_neighbours():
  with pytest.raises(ValueError, match="exceeds"):
    knn_graph.knn_indices(jnp.zeros((1, 2, 2, 3)), num_neighbors=9)


def test_knn_grapher_swaps_in_with_the_svga_parameter_layout():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 7, 7, 8))
  svga_grapher = svga.Grapher(graph_conv=svga.MRConv4d)
  knn_grapher = svga.Grapher(graph_conv=knn_graph.KnnGraphConv)
  shapes = lambda m: jax.tree_util.tree_map(
      lambda a: a.shape, jax.eval_shape(lambda x: m.init(jax.random.PRNGKey(0), x, False), x))
  assert shapes(svga_grapher) == shapes(knn_grapher)
  # numpy-filled variables: cheaper than compiling init's RNG programs on a small CI machine.
  rng = np.random.default_rng(0)
  v = jax.tree_util.tree_map_with_path(
      lambda p, a: jnp.ones(a.shape) if p[-1].key == "var" else jnp.asarray(
          rng.normal(0, 0.3, a.shape), jnp.float32),
      jax.eval_shape(lambda x: svga_grapher.init(jax.random.PRNGKey(0), x, False), x))
  y_svga = jax.jit(lambda v, x: svga_grapher.apply(v, x, False))(v, x)
  y_knn = jax.jit(lambda v, x: knn_grapher.apply(v, x, False))(v, x)
  assert y_svga.shape == y_knn.shape == x.shape
  assert not np.allclose(np.asarray(y_svga), np.asarray(y_knn))
