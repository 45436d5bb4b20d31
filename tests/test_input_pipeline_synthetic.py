"""End to end: the synthetic TFDS data set -> train/eval batches (smoke config)."""

import numpy as np
import pytest

from configs import synthetic as synthetic_config
from diffhand_jax import input_pipeline
from diffhand_jax import train


@pytest.fixture(scope='module')
def config(tmp_path_factory):
  config = synthetic_config.get_config('smoke')
  config.data.num_train = 16
  config.data.num_eval = 5
  config.model.use_depth = True
  config.data.tfds_data_dir = str(tmp_path_factory.mktemp('tfds'))
  config.eval.batch_size = 4
  return config


@pytest.mark.slow
def test_synthetic_train_batches_follow_the_contract(config):
  iterator = input_pipeline.create_train_iterator(config)
  size, batch_size = config.data.image_size, config.train.global_batch_size
  for _ in range(3):
    batch = next(iterator)
    assert batch['image'].shape == (batch_size, size, size, 3)
    assert batch['depth'].shape == (batch_size, size, size, 1)
    for b in range(batch_size):
      points = (batch['joints3d'][b] + batch['root'][b]).astype(np.float64)
      uvw = points @ batch['K'][b].T.astype(np.float64)
      np.testing.assert_allclose(
          uvw[:, :2] / uvw[:, 2:], (batch['joints2d'][b] + 1) * size / 2, atol=0.5
      )
      # Depth is relative to the root, exact (nearest sampling) on the hand: back in the camera
      # frame every depth value lies between the nearest and the farthest vertex.
      hand = batch['depth'][b][batch['depth'][b] != 0]
      assert hand.size > 20
      verts_z = batch['verts'][b, :, 2]
      assert verts_z.min() - 1e-4 <= hand.min() and hand.max() <= verts_z.max() + 1e-4
    assert set(batch['is_right'].tolist()) <= {0, 1}


@pytest.mark.slow
def test_synthetic_eval_covers_the_split_once(config):
  batches = input_pipeline.create_eval_iterator(config)
  assert len(batches) == 2 and batches.has_targets
  seen = [i for b in batches for i in b['index'][b['valid'] == 1].tolist()]
  assert sorted(seen) == list(range(5))


@pytest.mark.slow
def test_epochs_become_steps_from_the_counted_training_split(config):
  # The prepared split holds config.data.num_train examples: counted from the builder, not
  # taken from the config.
  assert input_pipeline.train_split_size(config) == config.data.num_train == 16
  config = config.copy_and_resolve_references()
  config.train.num_epochs = 3.0
  config.train.global_batch_size = 4
  resolved = train.resolve_epochs(config)
  # ceil(3 * 16 / 4) = 12 steps; one epoch = 4 steps; warm-up min(4, 12 // 10) = 1.
  assert resolved.train.num_steps == 12
  assert (resolved.train.checkpoint_every, resolved.train.eval_every) == (4, 40)
  assert resolved.optim.warmup_steps == 1
  assert config.train.num_steps != 12  # the caller's config is left as it was
  config.train.num_epochs = 0.0
  assert train.resolve_epochs(config) is config
