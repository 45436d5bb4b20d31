"""weights.py without torch: timm key names written out by hand, errors, msgpack, wiring.

The numerical comparison with timm itself is tests/test_weights_timm.py (optional extra).
"""

import os
import subprocess
import sys

from flax.traverse_util import flatten_dict
import jax
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from diffhand_jax import weights
from encoder_testing import model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH, DEPTH, PATCH = 64, 2, 16  # the 'micro' ViT


def timm_vit_state_dict(grid=4, distilled=False, seed=0):
  """A timm VisionTransformer state dict of the 'micro' size, key names as timm writes them."""
  rng = np.random.default_rng(seed)
  prefix = 2 if distilled else 1
  shapes = {
      'cls_token': (1, 1, WIDTH),
      'pos_embed': (1, prefix + grid * grid, WIDTH),
      'patch_embed.proj.weight': (WIDTH, 3, PATCH, PATCH),
      'patch_embed.proj.bias': (WIDTH,),
      'norm.weight': (WIDTH,),
      'norm.bias': (WIDTH,),
      'head.weight': (1000, WIDTH),
      'head.bias': (1000,),
  }
  if distilled:
    shapes.update(
        {'dist_token': (1, 1, WIDTH), 'head_dist.weight': (1000, WIDTH), 'head_dist.bias': (1000,)}
    )
  for i in range(DEPTH):
    b = f'blocks.{i}'
    shapes.update(
        {
            f'{b}.norm1.weight': (WIDTH,),
            f'{b}.norm1.bias': (WIDTH,),
            f'{b}.attn.qkv.weight': (3 * WIDTH, WIDTH),
            f'{b}.attn.qkv.bias': (3 * WIDTH,),
            f'{b}.attn.proj.weight': (WIDTH, WIDTH),
            f'{b}.attn.proj.bias': (WIDTH,),
            f'{b}.norm2.weight': (WIDTH,),
            f'{b}.norm2.bias': (WIDTH,),
            f'{b}.mlp.fc1.weight': (4 * WIDTH, WIDTH),
            f'{b}.mlp.fc1.bias': (4 * WIDTH,),
            f'{b}.mlp.fc2.weight': (WIDTH, 4 * WIDTH),
            f'{b}.mlp.fc2.bias': (WIDTH,),
        }
    )
  return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def save(state_dict, path):
  safetensors_numpy.save_file(state_dict, os.fspath(path))
  return path


def micro_config(**kwargs):
  return model_config('vit', 'micro', pretrained_image_size=64, **kwargs)


def test_vit_keys_land_where_the_module_docstring_says(tmp_path):
  sd = timm_vit_state_dict()
  params = weights.load_timm_checkpoint(save(sd, tmp_path / 'vit.safetensors'), micro_config())
  np.testing.assert_array_equal(
      params['patch_embed']['kernel'], sd['patch_embed.proj.weight'].transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(
      params['block1']['attn']['qkv']['kernel'], sd['blocks.1.attn.qkv.weight'].T
  )
  np.testing.assert_array_equal(params['block0']['mlp']['fc2']['bias'], sd['blocks.0.mlp.fc2.bias'])
  np.testing.assert_array_equal(params['block0']['norm2']['scale'], sd['blocks.0.norm2.weight'])
  np.testing.assert_array_equal(params['norm']['bias'], sd['norm.bias'])
  np.testing.assert_array_equal(params['pos_embed'], sd['pos_embed'])
  # Every leaf of the encoder is filled (no depth branch here).
  assert set(weights.expected_shapes(micro_config())) == set(flatten_dict(params))


def test_distilled_dist_token_and_pos_embed(tmp_path):
  sd = timm_vit_state_dict(distilled=True)
  config = model_config('deit', 'micro', distilled=True, pretrained_image_size=64)
  params = weights.load_timm_checkpoint(save(sd, tmp_path / 'd.safetensors'), config)
  np.testing.assert_array_equal(params['dist_token'], sd['dist_token'])
  assert params['pos_embed'].shape == (1, 2 + 16, WIDTH)


def test_pos_embed_resampled_to_the_config_grid(tmp_path):
  sd = timm_vit_state_dict(grid=8)  # a 128 px checkpoint into a 64 px (4x4) config
  params = weights.load_timm_checkpoint(save(sd, tmp_path / 'v.safetensors'), micro_config())
  expected = weights.vit.resample_pos_embed(sd['pos_embed'], (8, 8), (4, 4), 1)
  np.testing.assert_allclose(params['pos_embed'], expected, atol=1e-6)
  np.testing.assert_array_equal(params['pos_embed'][:, :1], sd['pos_embed'][:, :1])


@pytest.mark.parametrize(
    'edit,error,pattern',
    [
        (lambda sd: sd.pop('blocks.1.mlp.fc1.bias'), KeyError, r"'blocks\.1\.mlp\.fc1\.bias'"),
        (
            lambda sd: sd.update({'blocks.0.attn.proj.weight': np.zeros((64, 32), np.float32)}),
            ValueError,
            r"'blocks\.0\.attn\.proj\.weight'.*\(32, 64\).*\(64, 64\)",
        ),
        (
            lambda sd: sd.update({'blocks.0.ls1.gamma': np.zeros(64, np.float32)}),
            ValueError,
            r'no counterpart.*blocks\.0\.ls1\.gamma',
        ),
        (
            lambda sd: sd.update({'blocks.2.norm1.weight': np.zeros(64, np.float32)}),
            ValueError,
            r'blocks\.2\.norm1\.weight',
        ),  # a deeper checkpoint than the config
        (
            lambda sd: sd.update({'dist_token': np.zeros((1, 1, 64), np.float32)}),
            ValueError,
            r'dist_token',
        ),  # a distilled checkpoint into a non-distilled config
    ],
)
def test_mismatches_name_the_key(tmp_path, edit, error, pattern):
  sd = timm_vit_state_dict()
  edit(sd)
  with pytest.raises(error, match=pattern):
    weights.load_timm_checkpoint(save(sd, tmp_path / 'bad.safetensors'), micro_config())


def test_wrong_prefix_count_is_explained(tmp_path):
  sd = timm_vit_state_dict()
  config = model_config('deit', 'micro', distilled=True, pretrained_image_size=64)
  sd['dist_token'] = np.zeros((1, 1, WIDTH), np.float32)
  with pytest.raises(ValueError, match='pos_embed'):
    weights.load_timm_checkpoint(save(sd, tmp_path / 'bad.safetensors'), config)


def test_unknown_format_and_missing_file(tmp_path):
  (tmp_path / 'w.npz').write_bytes(b'')
  with pytest.raises(ValueError, match='unknown checkpoint format'):
    weights.load_timm_checkpoint(tmp_path / 'w.npz', micro_config())
  with pytest.raises(FileNotFoundError):
    weights.load_timm_checkpoint(tmp_path / 'absent.safetensors', micro_config())


def test_hrnet_needs_the_frozen_bn_form():
  with pytest.raises(ValueError, match='frozen_bn'):
    weights.convert_state_dict({}, model_config('hrnet', 'w8'))


def test_cli_convert_then_msgpack_loads_the_same(tmp_path):
  sd = timm_vit_state_dict(seed=3)
  src = save(sd, tmp_path / 'vit.safetensors')
  out = tmp_path / 'vit.msgpack'
  subprocess.run(
      [
          sys.executable,
          '-m',
          'diffhand_jax.weights',
          'convert',
          os.fspath(src),
          os.fspath(out),
          f'--config={ROOT}/configs/synthetic.py:smoke',
          '--config.model.encoder=vit',
          '--config.model.pretrained_image_size=64',
      ],
      cwd=ROOT,
      check=True,
      capture_output=True,
      env=dict(os.environ, JAX_PLATFORMS='cpu'),
  )
  a = weights.load_timm_checkpoint(src, micro_config())
  b = weights.load_timm_checkpoint(out, micro_config())
  jax.tree.map(np.testing.assert_array_equal, a, b)
  with pytest.raises(ValueError, match='shape'):  # converted for another size
    weights.load_timm_checkpoint(out, model_config('vit', 'micro', pretrained_image_size=32))


@pytest.mark.slow
def test_pretrained_path_loads_at_initialisation(tmp_path):
  """train.build_task's init fills the encoder from config.model.pretrained_path."""
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  from diffhand_jax import train  # pylint: disable=g-import-not-at-top

  sd = timm_vit_state_dict(seed=4)
  config = synthetic.get_config('smoke')
  config.model.encoder = 'vit'  # the timm checkpoint is a ViT (the smoke default is the ResNet)
  config.model.pretrained_image_size = 64
  config.model.pretrained_path = os.fspath(save(sd, tmp_path / 'vit.safetensors'))
  task = train.build_task(config, os.fspath(tmp_path / 'run'))
  params = task.init_params(jax.random.PRNGKey(0))
  np.testing.assert_array_equal(
      params['encoder']['block0']['attn']['qkv']['kernel'], sd['blocks.0.attn.qkv.weight'].T
  )
  np.testing.assert_array_equal(params['encoder']['cls_token'], sd['cls_token'])


def test_load_pretrained_encoder_replaces_the_encoder_only(tmp_path):
  """Decoder leaves and the depth branch keep their values; every other encoder leaf loads."""
  from configs import synthetic  # pylint: disable=g-import-not-at-top

  sd = timm_vit_state_dict(seed=5)
  config = synthetic.get_config('smoke')
  config.model.update(
      encoder='vit',
      pretrained_image_size=64,
      use_depth=True,
      pretrained_path=os.fspath(save(sd, tmp_path / 'vit.safetensors')),
  )
  shapes = weights.expected_shapes(config.model)
  encoder = {p: np.full(s, 7.0, np.float32) for p, s in shapes.items()}
  params = {
      'encoder': weights.flax.traverse_util.unflatten_dict(encoder),
      'decoder': {'out': {'kernel': np.ones((3, 3), np.float32)}},
  }
  loaded = weights.load_pretrained_encoder(params, config)
  flat = flatten_dict(loaded['encoder'])
  assert any(p[0] == 'depth' for p in flat)
  for p, value in flat.items():
    assert np.all(np.asarray(value) == 7.0) == (p[0] == 'depth'), p
  np.testing.assert_array_equal(loaded['decoder']['out']['kernel'], np.ones((3, 3)))
  config.model.pretrained_path = ''
  assert weights.load_pretrained_encoder(params, config) is params
