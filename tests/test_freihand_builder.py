"""Tests of the `freihand` TFDS builder on a tiny directory in the official layout."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from datasets import freihand as freihand_reader
from datasets.freihand import freihand
from datasets.freihand import testing


@pytest.mark.slow
def test_builder_prepares_both_splits_like_the_reader(tmp_path):
  root = tmp_path / 'fh'
  testing.write_layout(root, num_train=2, num_eval=2, image_size=32, eval_annotations=False)
  builder = freihand.Freihand(data_dir=str(tmp_path / 'tfds'))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
  assert builder.info.splits['train'].num_examples == 8
  assert builder.info.splits['evaluation'].num_examples == 2
  expected = {e['image_id']: e for e in freihand_reader.examples(root, 'training')}
  for record in tfds.as_numpy(builder.as_dataset(split='train')):
    reference = expected.pop(int(record['image_id']))
    # The JPEG bytes are stored unchanged, so TF's decoder sees the same file as PIL.
    np.testing.assert_allclose(record['image'], reference['image'], atol=2)
    for key in ('K', 'joints3d', 'joints2d', 'verts', 'pose', 'betas', 'mask'):
      np.testing.assert_array_equal(record[key], reference[key], err_msg=key)
    assert freihand_reader.VERSIONS[record['version']] == reference['version']
    assert record['id'] == reference['image_id'] and record['has_targets']
  assert not expected
  for record in tfds.as_numpy(builder.as_dataset(split='evaluation')):
    assert not record['has_targets']
    assert not record['verts'].any() and not record['mask'].any()
    assert record['image'].shape == (32, 32, 3)


def test_builder_without_manual_dir_files_fails_clearly(tmp_path):
  builder = freihand.Freihand(data_dir=str(tmp_path / 'tfds'))
  with pytest.raises(FileNotFoundError, match='training_K.json'):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path))
    )


@pytest.mark.slow
def test_depth_config_reads_the_mirrored_depth_directory(tmp_path):
  root = tmp_path / 'fh'
  testing.write_layout(root, num_train=1, num_eval=1, image_size=16)
  for prefix, count in (('training', 4), ('evaluation', 1)):
    (root / 'depth' / prefix / 'rgb').mkdir(parents=True)
    for image_id in range(count):
      np.save(
          root / 'depth' / prefix / 'rgb' / f'{image_id:08d}.npy',
          np.full((16, 16), 0.5 + image_id / 100, np.float32),
      )
  builder = freihand.Freihand(config='depth', data_dir=str(tmp_path / 'tfds'))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
  for record in tfds.as_numpy(builder.as_dataset(split='train')):
    assert record['depth'].shape == (16, 16, 1)
    np.testing.assert_allclose(record['depth'], 0.5 + record['image_id'] / 100, rtol=1e-6)
