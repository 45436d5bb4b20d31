"""End to end: FreiHAND-layout files -> TFDS builder -> train/eval numpy batches."""

import numpy as np
import pytest

from configs import synthetic as synthetic_config
from datasets.freihand import testing
from diffhand_jax import input_pipeline


@pytest.fixture(scope='module')
def config(tmp_path_factory):
  root = tmp_path_factory.mktemp('freihand')
  written = testing.write_layout(
      root / 'files', num_train=3, num_eval=3, image_size=48, eval_annotations=False
  )
  config = synthetic_config.get_config('smoke')
  config.data.name = 'freihand'
  config.data.root = str(root / 'files')
  config.data.tfds_data_dir = str(root / 'tfds')
  config.data.image_size = 32
  config.train.global_batch_size = 4
  config.eval.batch_size = 2
  return config, written


@pytest.mark.slow
def test_train_iterator_on_freihand(config):
  config, _ = config
  iterator = input_pipeline.create_train_iterator(config)
  batches = [next(iterator) for _ in range(4)]  # 12 images -> 3 steps per epoch
  for batch in batches:
    assert batch['image'].shape == (4, 32, 32, 3) and batch['image'].dtype == np.float32
    assert batch['verts'].shape == (4, 778, 3)
    for b in range(4):
      points = batch['joints3d'][b] + batch['root'][b]
      uvw = points.astype(np.float64) @ batch['K'][b].T.astype(np.float64)
      np.testing.assert_allclose(uvw[:, :2] / uvw[:, 2:], (batch['joints2d'][b] + 1) * 16, atol=0.5)
  ids = np.concatenate([b['index'] for b in batches[:3]])
  assert sorted(ids.tolist()) == list(range(12))
  resumed = next(input_pipeline.create_train_iterator(config, start_step=3))
  for key in resumed:
    np.testing.assert_array_equal(resumed[key], batches[3][key], err_msg=key)


@pytest.mark.slow
def test_eval_iterator_without_annotations_uses_whole_images(config):
  config, written = config
  batches = input_pipeline.create_eval_iterator(config)
  assert len(batches) == 2 and batches.num_examples == 3 and not batches.has_targets
  seen = []
  for batch in batches:
    seen.extend(batch['index'][batch['valid'] == 1].tolist())
    # No joints: the crop is the whole 48 px image scaled to 32 px (pixel centres on integers).
    for b, index in enumerate(batch['index'][batch['valid'] == 1]):
      K = written['evaluation']['K'][index]
      expected = np.array(K, np.float64)
      expected[:2] *= 32 / 48
      expected[:2, 2] += 15.5 - 23.5 * 32 / 48
      np.testing.assert_allclose(batch['K'][b], expected, rtol=1e-5, atol=1e-4)
  assert sorted(seen) == [0, 1, 2]
  first = next(iter(batches))
  # A uniformly coloured image stays uniform when the whole image is the crop.
  image = input_pipeline.denormalize_image(first['image'][0])
  np.testing.assert_allclose(image, np.broadcast_to(image[16, 16], image.shape), atol=1.0)
  config.eval.num_examples = 1
  try:
    only_one = input_pipeline.create_eval_iterator(config)
    assert len(only_one) == 1
    assert [b['valid'].tolist() for b in only_one] == [[1.0, 0.0]]
  finally:
    config.eval.num_examples = -1
