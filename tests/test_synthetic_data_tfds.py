"""The `synthetic_hands` TFDS builder: prepare a tiny data set, read it back, compare."""

import numpy as np
import pytest

from configs import synthetic as synthetic_config
from datasets.synthetic import generate
from datasets.synthetic import render_pool
from datasets.synthetic import synthetic_hands
from diffhand_jax import procedural_mano

SIZE = 64


def _config(data_dir, use_depth=True, num_train=8, num_eval=4, render_size=SIZE):
  config = synthetic_config.get_config()
  config.seed = 5
  config.data.tfds_data_dir = str(data_dir)
  config.data.num_train = num_train
  config.data.num_eval = num_eval
  config.data.render_size = render_size
  config.model.use_depth = use_depth
  return config


def _read(builder, split):
  dataset = builder.as_dataset(split=split, shuffle_files=False)
  return sorted(
      (dict(example) for example in dataset.as_numpy_iterator()), key=lambda example: example['id']
  )


@pytest.mark.slow
def test_prepare_reads_back_the_numpy_examples(tmp_path, capfd):
  config = _config(tmp_path)
  builder = synthetic_hands.prepare(config)
  assert 'examples/s' in capfd.readouterr().err
  hand_model = procedural_mano.load_hand_model(config)
  for split, stream, count in (
      ('train', generate.TRAIN_STREAM, 8),
      ('evaluation', generate.EVAL_STREAM, 4),
  ):
    stored = _read(builder, split)
    assert [int(example['id']) for example in stored] == list(range(count))
    for example in stored:
      expected = generate.make_example(
          hand_model, config.seed, int(example['id']), SIZE, stream=stream
      )
      assert set(example) == set(expected)
      for key, value in expected.items():
        np.testing.assert_array_equal(example[key], value, err_msg=f'{split} {key}')
  train, evaluation = _read(builder, 'train'), _read(builder, 'evaluation')
  assert not np.array_equal(train[0]['verts'], evaluation[0]['verts'])

  # A second prepare reuses the data (no generation, no progress output).
  again = synthetic_hands.prepare(config)
  assert 'examples/s' not in capfd.readouterr().err
  assert again.info.splits['train'].num_examples == 8


@pytest.mark.slow
def test_without_depth_has_no_depth_feature(tmp_path):
  builder = synthetic_hands.prepare(_config(tmp_path, use_depth=False, num_train=2, num_eval=1))
  example = _read(builder, 'train')[0]
  assert 'depth' not in example and example['image'].shape == (SIZE, SIZE, 3)


def test_config_names_never_collide(tmp_path):
  base = synthetic_hands.builder_for(_config(tmp_path)).builder_config.name
  variants = [
      _config(tmp_path, use_depth=False),
      _config(tmp_path, num_train=9),
      _config(tmp_path, num_eval=5),
      _config(tmp_path, render_size=96),
  ]
  other_seed = _config(tmp_path)
  other_seed.seed = 6
  other_hand = _config(tmp_path)
  other_hand.mano_seed = 1
  other_tips = _config(tmp_path)
  other_tips.tip_vertex_ids = (745, 320, 443, 555, 672)
  names = {
      synthetic_hands.builder_for(config).builder_config.name
      for config in variants + [other_seed, other_hand, other_tips]
  }
  assert base not in names and len(names) == 7
  assert base == synthetic_hands.builder_for(_config(tmp_path)).builder_config.name


def test_bad_config_raises(tmp_path):
  with pytest.raises(ValueError, match='image_size'):
    synthetic_hands.builder_for(_config(tmp_path, render_size=4))
  with pytest.raises(ValueError, match='split sizes'):
    synthetic_hands.builder_for(_config(tmp_path, num_train=0, num_eval=0))
  builder = synthetic_hands.SyntheticHands(
      config=synthetic_hands.builder_for(_config(tmp_path)).builder_config,
      data_dir=str(tmp_path),
      hand_model=procedural_mano.procedural_hand(1),
  )
  with pytest.raises(ValueError, match='fingerprint'):
    builder.download_and_prepare()
  with pytest.raises(ValueError, match='make_config'):
    synthetic_hands.SyntheticHands(data_dir=str(tmp_path))


def _spec(**changes):
  fields = dict(
      seed=0,
      stream=generate.TRAIN_STREAM,
      image_size=32,
      tip_ids=(744, 320, 443, 555, 672),
      orientation='held',
      with_depth=False,
  )
  return render_pool.SplitSpec(**{**fields, **changes})


@pytest.mark.slow
def test_worker_pool_renders_what_one_process_renders(monkeypatch):
  monkeypatch.setattr(render_pool, 'WINDOW_PER_WORKER', 1)  # 2 chunks in flight: refills run
  hand_model = procedural_mano.procedural_hand(0)
  spec = _spec(seed=3, stream=generate.EVAL_STREAM, with_depth=True)
  count = 3 * render_pool.CHUNK + 3  # four chunks, the last one short
  pooled = list(render_pool.render_split(hand_model, spec, count, num_workers=2, min_parallel=0))
  assert [key for key, _ in pooled] == list(range(count))
  for key, example in pooled:
    expected = generate.make_example(hand_model, 3, key, 32, stream=generate.EVAL_STREAM)
    for name in ('verts', 'joints2d', 'depth', 'pose', 'K'):
      np.testing.assert_array_equal(example[name], expected[name], err_msg=name)
    assert example['image'] == render_pool.png_bytes(expected['image'])
    assert example['mask'] == render_pool.png_bytes(expected['mask'])


def test_render_split_checks_workers():
  with pytest.raises(ValueError, match='num_workers'):
    next(render_pool.render_split(None, None, 4, num_workers=0))


@pytest.mark.slow
def test_worker_error_reaches_the_caller():
  spec = _spec(seed=-1)  # a negative seed: the worker's check raises
  examples = render_pool.render_split(
      procedural_mano.procedural_hand(0), spec, 4, num_workers=2, min_parallel=0
  )
  with pytest.raises(ValueError, match='seed'):
    next(examples)
