"""TFDS builder `ho3d`: HO-3D v2 from the user's files (reader.py).

  builder = Ho3d(data_dir='data/tfds', mano_dir='/path/to/mano/models')   # 'rgb' | 'depth'
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir='/path/to/HO3D_v2'))

Splits: 'train' (train.txt, annotated frames) and 'evaluation' (evaluation.txt, every frame,
`has_targets` False: all-zero targets; score them on the online server with
`reader.write_submission`). `bbox` is the given handBoundingBox for evaluation (the input
pipeline crops evaluation examples around it) and the 2D joints' extent for training.
The 'depth' config reads <manual_dir>/depth/<train|evaluation>/<SEQ>/rgb/<FRAME>.png|.npy.
"""

import numpy as np
import tensorflow_datasets as tfds

from datasets import features
from datasets.ho3d import reader


class Ho3d(tfds.core.GeneratorBasedBuilder):
  """HO-3D v2: right hands manipulating YCB objects."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'HO3D_v2 layout; evaluation split without 3D targets.'}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name='rgb', description='images and annotations'),
      tfds.core.BuilderConfig(
          name='depth',
          description='plus depth maps from ' '<manual_dir>/depth/, mirroring the rgb image paths',
      ),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download HO3D_v2 (https://www.tugraz.at/index.php?id=40231), unzip it so that the directory
  holds train.txt, evaluation.txt, train/ and evaluation/, and pass it as manual_dir
  (config.data.root). MANO_RIGHT.pkl must be in the folder of config.mano_path.
  """

  def __init__(self, *, mano_dir=None, **kwargs):
    self._mano_dir = mano_dir
    super().__init__(**kwargs)

  def _info(self):
    spec = features.hand_features(
        with_depth=self.builder_config.name == 'depth',
        image_encoding='png',
        extra=features.bbox_features(),
    )
    return self.dataset_info_from_configs(
        features=spec, homepage='https://github.com/shreyashampali/ho3d'
    )

  def _split_generators(self, dl_manager):
    if not self._mano_dir:
      raise ValueError('Ho3d needs mano_dir (the folder of MANO_RIGHT.pkl)')
    root = dl_manager.manual_dir
    return {
        'train': self._generate_examples(root, 'train'),
        'evaluation': self._generate_examples(root, 'evaluation'),
    }

  def _generate_examples(self, root, split):
    with_depth = self.builder_config.name == 'depth'
    for example in reader.examples(
        root, split, mano_dir=self._mano_dir, depth_dir=root / 'depth' if with_depth else None
    ):
      record = features.to_record(example, with_depth)
      if example['has_targets']:
        low, high = example['joints2d'].min(0), example['joints2d'].max(0)
        bbox = np.concatenate([low, high]).astype(np.float32)
      else:
        bbox = example['bbox']
      record.update(bbox=bbox, has_targets=example['has_targets'])
      yield example['id'], record
