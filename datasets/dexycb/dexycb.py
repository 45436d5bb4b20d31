"""TFDS builder `dexycb`: DexYCB, setup s0, from the user's files (reader.py).

  builder = Dexycb(data_dir='data/tfds', mano_dir='/path/to/mano/models')  # 'rgb' | 'depth'
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir='/path/to/dex-ycb'))

Splits: 'train' = s0 train, 'validation' = s0 val, 'evaluation' = s0 test (the split the
hand-mesh papers report); unannotated frames are left out, `id` keeps the official index.
Features: `datasets.features.hand_features` (JPEG bytes as released) plus `bbox` [4] and
`has_targets`. The 'depth' config reads precomputed depth maps from
<manual_dir>/depth/<subject>/<sequence>/<serial>/color_%06d.png (16-bit mm) or .npy (metres).
"""

import tensorflow_datasets as tfds

from datasets import features
from datasets.dexycb import reader

SPLITS = {'train': 'train', 'validation': 'val', 'evaluation': 'test'}


class Dexycb(tfds.core.GeneratorBasedBuilder):
  """DexYCB s0: right and left hands grasping YCB objects, 8 cameras."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'DexYCB release layout, setup s0, annotated frames.'}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name='rgb', description='images and annotations'),
      tfds.core.BuilderConfig(
          name='depth',
          description='plus depth maps from '
          '<manual_dir>/depth/, mirroring the colour image paths',
      ),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download DexYCB (https://dex-ycb.github.io) and extract every archive into one directory
  holding calibration/ and the ten 2020*-subject-* folders; pass it as manual_dir
  (config.data.root). MANO_RIGHT.pkl and MANO_LEFT.pkl (mano.is.tue.mpg.de) must be in the
  folder of config.mano_path.
  """

  def __init__(self, *, mano_dir=None, **kwargs):
    self._mano_dir = mano_dir
    super().__init__(**kwargs)

  def _info(self):
    spec = features.hand_features(
        with_depth=self.builder_config.name == 'depth',
        image_encoding='jpeg',
        extra=features.bbox_features(),
    )
    return self.dataset_info_from_configs(features=spec, homepage='https://dex-ycb.github.io')

  def _split_generators(self, dl_manager):
    if not self._mano_dir:
      raise ValueError('Dexycb needs mano_dir (the folder of MANO_RIGHT.pkl and MANO_LEFT.pkl)')
    root = dl_manager.manual_dir
    return {name: self._generate_examples(root, split) for name, split in SPLITS.items()}

  def _generate_examples(self, root, split):
    with_depth = self.builder_config.name == 'depth'
    for example in reader.examples(
        root, split, mano_dir=self._mano_dir, depth_dir=root / 'depth' if with_depth else None
    ):
      record = features.to_record(example, with_depth)
      record.update(bbox=example['bbox'], has_targets=True)
      yield example['id'], record
