"""The generic state_dict converters on a small model registered only for this test."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilevis_jax import interop, layers
from mobilevis_jax.interop import keymap
from mobilevis_jax.models import registry


class _Toy(nn.Module):
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train=False):
    x = layers.ConvBN(4, 3, 2, name="stem")(x, train)
    x = layers.LayerScale(0.5, name="ls")(x)
    x = jnp.mean(x, (1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


@pytest.fixture(scope="module")
def toy():
  name = "_toy_for_keymap_test"
  def _toy_for_keymap_test(num_classes=3):
    return _Toy(num_classes=num_classes)

  # The family is the registering module's stem, here this test module's.
  registry.register_model(default_resolution=8)(_toy_for_keymap_test)
  assert registry.model_info(name).family == registry.family_of(__name__)

  @keymap.register_torch_layout("official")
  def _layout(model_name, model, variables):
    return (keymap.conv_bn("stem", ("stem",)) + keymap.param("ls.gamma", ("ls", "scale"), (4, 1, 1))
            + keymap.dense("fc", ("head",), torch_shape=(model.num_classes, 4, 1, 1))
            + keymap.alias_prefix(keymap.dense("fc", ("head",)), "fc.", "fc_copy."))

  yield name
  registry._MODELS.pop(name)
  keymap._LAYOUTS.pop((registry.family_of(__name__), "official"))


def _variables(name, **kw):
  model = registry.create_model(name, **kw)
  v = model.init(jax.random.PRNGKey(0), jnp.ones((1, 8, 8, 3)), train=False)
  return model, v


def test_round_trip_and_layouts(toy):
  model, v = _variables(toy)
  sd = interop.to_torch_state_dict(toy, v)
  assert list(sd) == ["stem.c.weight", "stem.bn.weight", "stem.bn.bias", "stem.bn.running_mean",
                      "stem.bn.running_var", "stem.bn.num_batches_tracked", "ls.gamma", "fc.weight",
                      "fc.bias", "fc_copy.weight", "fc_copy.bias"]
  assert sd["stem.c.weight"].shape == (4, 3, 3, 3)
  np.testing.assert_array_equal(sd["stem.c.weight"], np.asarray(v["params"]["stem"]["conv"]["kernel"]).transpose(3, 2, 0, 1))
  assert sd["fc.weight"].shape == (3, 4, 1, 1) and sd["ls.gamma"].shape == (4, 1, 1)
  assert sd["stem.bn.num_batches_tracked"].dtype == np.int64
  back = interop.from_torch_state_dict(toy, sd)
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, dict(v)))


def test_errors_name_the_keys(toy):
  _, v = _variables(toy)
  sd = interop.to_torch_state_dict(toy, v)
  bad = dict(sd)
  del bad["stem.bn.running_var"]
  bad["stem.extra"] = np.zeros(1)
  bad["fc.bias"] = np.zeros(5, np.float32)
  with pytest.raises(interop.StateDictError) as e:
    interop.from_torch_state_dict(toy, bad)
  msg = str(e.value)
  assert "stem.bn.running_var" in msg and "stem.extra" in msg and "fc.bias" in msg
  assert "num_classes" in msg  # the shape error hints at the usual cause
  bad = dict(sd)
  bad["fc_copy.weight"] = sd["fc.weight"] + 1
  with pytest.raises(interop.StateDictError, match="fc_copy.weight"):
    interop.from_torch_state_dict(toy, bad)
  # Built with matching kwargs, a differently sized head loads.
  _, v5 = _variables(toy, num_classes=5)
  sd5 = interop.to_torch_state_dict(toy, v5, num_classes=5)
  assert interop.from_torch_state_dict(toy, sd5, num_classes=5)["params"]["head"]["kernel"].shape == (4, 5)


def test_unmapped_flax_leaf_is_a_bug_not_a_silent_skip(toy):
  _, v = _variables(toy)
  v = {**v, "params": {**v["params"], "stray": {"kernel": jnp.zeros(2)}}}
  with pytest.raises(RuntimeError, match="stray"):
    interop.to_torch_state_dict(toy, v)


def test_unknown_layout_and_model(toy):
  with pytest.raises(KeyError, match=f"Did you mean: {toy}"):
    registry.create_model(toy[:-2])
  with pytest.raises(ValueError, match="layout"):
    keymap.get_layout("_no_family", "official")


def test_file_io_round_trip_and_refuses_code(tmp_path, toy):
  torch = pytest.importorskip("torch")
  _, v = _variables(toy)
  sd = interop.to_torch_state_dict(toy, v)
  for suffix in (".safetensors", ".pth"):
    path = tmp_path / f"w{suffix}"
    interop.save_state_dict(sd, path)
    loaded = interop.load_state_dict(path)
    assert list(loaded) == list(sd) or set(loaded) == set(sd)
    for k in sd:
      np.testing.assert_array_equal(loaded[k], sd[k])
  assert "model" in torch.load(tmp_path / "w.pth", weights_only=True)

  marker = tmp_path / "pwned"

  class Payload:
    def __reduce__(self):
      import os
      return (os.system, (f"touch {marker}",))

  evil = tmp_path / "evil.pth"
  torch.save({"model": {"x": torch.zeros(1)}, "extra": Payload()}, evil)
  with pytest.raises(interop.StateDictError, match="refusing"):
    interop.load_state_dict(evil)
  assert not marker.exists()
