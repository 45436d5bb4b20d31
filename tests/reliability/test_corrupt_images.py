"""Issue 13: a data set with some corrupt images (FreiHAND layout, the TFDS build reads them).

Default (config.data.skip_corrupt = False): the pipeline fails naming the first bad file and
prepares nothing. skip_corrupt = True: each bad file is named in a warning, the count is
logged, and the training stream holds exactly the readable images.
"""

import logging

import numpy as np
import pytest

from configs import synthetic as synthetic_config
from datasets.freihand import reader
from datasets.freihand import testing
from diffhand_jax import input_pipeline

NUM_TRAIN = 3  # annotations: x 4 versions = 12 training images
CORRUPT = {
    '00000002.jpg': lambda data: data[: len(data) // 3],  # truncated
    '00000005.jpg': lambda data: b'\xff\xd8\xff\xe0' + bytes(range(256)) * 4,  # JPEG header, junk
    '00000009.jpg': lambda data: b'',  # empty
}


def _config(tmp_path, skip_corrupt):
  root = tmp_path / 'files'
  testing.write_layout(root, num_train=NUM_TRAIN, num_eval=2, image_size=48)
  for name, damage in CORRUPT.items():
    path = root / 'training' / 'rgb' / name
    path.write_bytes(damage(path.read_bytes()))
  config = synthetic_config.get_config('smoke')
  config.data.update(
      name='freihand',
      root=str(root),
      tfds_data_dir=str(tmp_path / 'tfds'),
      image_size=32,
      skip_corrupt=skip_corrupt,
  )
  config.train.global_batch_size = 3
  return config


def test_corrupt_images_fail_the_pipeline_naming_the_file_by_default(tmp_path):
  config = _config(tmp_path, skip_corrupt=False)
  with pytest.raises(reader.CorruptFileError, match=r'00000002\.jpg'):
    input_pipeline.create_train_iterator(config)


def test_corrupt_images_are_skipped_named_and_counted_when_configured(tmp_path, caplog):
  config = _config(tmp_path, skip_corrupt=True)
  with caplog.at_level(logging.WARNING), pytest.warns(UserWarning, match='skipped 3 corrupt'):
    iterator = input_pipeline.create_train_iterator(config)
  for name in CORRUPT:
    assert any(name in record.getMessage() for record in caplog.records), name
  ids = np.concatenate([next(iterator)['index'] for _ in range(3)])  # 9 readable: 3 batches
  bad = {int(name[:8]) for name in CORRUPT}
  assert sorted(ids.tolist()) == [i for i in range(4 * NUM_TRAIN) if i not in bad]
