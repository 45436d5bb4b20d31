"""TFDS builder `freihand`: FreiHAND (v2) from the user's manually downloaded files.

Prepare from Python (the `tfds build` CLI needs apache-beam):

  builder = Freihand(data_dir='data/tfds')            # config 'rgb' (default) or 'depth'
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir='/path/to/FreiHAND_pub_v2'))

Features: `datasets.features.hand_features` (JPEG images, stored byte-for-byte as released) plus
`version` (ClassLabel over reader.VERSIONS), `image_id`, `scale` and `has_targets`. Evaluation
examples without the (optional) annotation files have `has_targets = False` and all-zero
targets; examples without a mask file have an all-zero mask.
"""

import numpy as np
import tensorflow_datasets as tfds

from datasets import features
from datasets.freihand import reader


class Freihand(tfds.core.GeneratorBasedBuilder):
  """FreiHAND: 32,560 training annotations x 4 image versions, 3,960 evaluation images."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'FreiHAND_pub_v2 layout, evaluation annotations when present.'}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name='rgb', description='images and annotations'),
      tfds.core.BuilderConfig(
          name='depth',
          description='plus depth maps from <manual_dir>/depth/, mirroring the '
          'image paths (training/rgb/%08d.png 16-bit mm, or .npy float metres)',
      ),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download FreiHAND_pub_v2.zip (and FreiHAND_pub_v2_eval.zip for the evaluation annotations)
  from https://lmb.informatik.uni-freiburg.de/resources/datasets/FreihandDataset.en.html, unzip
  both into one directory so that it holds training_K.json, training/rgb/, evaluation_K.json,
  evaluation/rgb/, ..., and pass that directory as manual_dir
  (config.data.root). For the 'depth' config put precomputed depth maps under
  <manual_dir>/depth/training/rgb/%08d.png (or .npy) and <manual_dir>/depth/evaluation/rgb/.
  """

  def __init__(self, *, skip_corrupt=False, **kwargs):
    """skip_corrupt: leave out images/masks/depth maps that cannot be decoded (each named in a
    warning, their count reported at the end) instead of failing the build naming the first."""
    super().__init__(**kwargs)
    self._skip_corrupt = bool(skip_corrupt)

  @property
  def _with_depth(self):
    return self.builder_config.name == 'depth'

  def _info(self):
    extra = dict(
        version=tfds.features.ClassLabel(names=list(reader.VERSIONS)),
        image_id=tfds.features.Tensor(shape=(), dtype=np.int64),
        scale=tfds.features.Tensor(shape=(), dtype=np.float32),
        has_targets=tfds.features.Tensor(shape=(), dtype=np.bool_),
    )
    return self.dataset_info_from_configs(
        features=features.hand_features(self._with_depth, image_encoding='jpeg', extra=extra),
        homepage='https://lmb.informatik.uni-freiburg.de/projects/freihand/',
    )

  def _split_generators(self, dl_manager):
    root = dl_manager.manual_dir
    return {
        'train': self._generate_examples(root, 'training'),
        'evaluation': self._generate_examples(root, 'evaluation'),
    }

  def _generate_examples(self, root, split):
    depth_dir = root / 'depth' if self._with_depth else None
    for example in reader.examples(
        root, split, depth_dir=depth_dir, skip_corrupt=self._skip_corrupt
    ):
      yield example['image_id'], _to_features(example, self._with_depth)


def _to_features(example, with_depth):
  """Maps a reader example onto the builder's fixed schema (zeros where nothing was read)."""
  record = features.to_record(example, with_depth)
  record.update({name: example[name] for name in ('version', 'image_id', 'scale', 'has_targets')})
  return record
