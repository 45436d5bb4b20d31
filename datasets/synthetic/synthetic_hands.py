"""TFDS builder `synthetic_hands`: rendered synthetic hands, splits 'train' and 'evaluation'.

Nothing is downloaded and no manual files are needed: every example is made by
`generate.make_example`. The builder-config name is a function of everything that changes the
data (image size, split sizes, seed, depth on/off, a fingerprint of the hand model and tip
vertices), so two different settings never collide in one data_dir.

Usage (from Python; the `tfds build` CLI needs apache-beam):
  builder = prepare(config)          # builds into config.data.tfds_data_dir if missing
  train = builder.as_dataset(split='train')
"""

import dataclasses
import hashlib
import sys
import time

import numpy as np
import tensorflow_datasets as tfds

from datasets import features
from datasets.synthetic import generate
from datasets.synthetic import render_pool
from datasets.synthetic import sampler
from diffhand_jax import mano
from diffhand_jax import procedural_mano

_DESCRIPTION = """Synthetic right and left hands rendered on the CPU from a MANO-format hand
model (random pose, shape, rotation, camera, skin, light, background, occluders), with exact
depth, masks, 3D/2D joints, vertices and MANO parameters."""
SPLIT_STREAMS = {'train': generate.TRAIN_STREAM, 'evaluation': generate.EVAL_STREAM}
_HAND_FIELDS = (
    'v_template',
    'shapedirs',
    'posedirs',
    'J_regressor',
    'weights',
    'parents',
    'faces',
    'hands_mean',
)


def hand_fingerprint(hand_model, tip_ids=mano.TIP_VERTEX_IDS):
  """A short hex digest of the arrays that shape the data (model arrays and tip vertices)."""
  digest = hashlib.sha1()
  for name in _HAND_FIELDS:
    value = np.ascontiguousarray(getattr(hand_model, name))
    digest.update(name.encode())
    digest.update(str(value.dtype).encode() + str(value.shape).encode())
    digest.update(value.tobytes())
  digest.update(np.asarray(tip_ids, np.int64).tobytes())
  return digest.hexdigest()[:10]


@dataclasses.dataclass(eq=False)
class SyntheticHandsConfig(tfds.core.BuilderConfig):
  """What the data depend on; make it with `make_config` so the name matches the fields."""

  image_size: int = 224
  num_train: int = 8192
  num_eval: int = 512
  seed: int = 0
  with_depth: bool = False
  hand: str = ''  # hand_fingerprint of the model the data come from
  tip_ids: tuple = mano.TIP_VERTEX_IDS
  orientation: str = 'held'  # sampler.ORIENTATIONS


def make_config(
    hand_model,
    image_size,
    num_train,
    num_eval,
    seed,
    with_depth,
    tip_ids=mano.TIP_VERTEX_IDS,
    orientation='held',
):
  """A `SyntheticHandsConfig` named after its parameters.

  Raises:
    ValueError: on a non-positive size, negative split sizes, a negative seed or an unknown
      orientation distribution.
  """
  if orientation not in sampler.ORIENTATIONS:
    raise ValueError(f'unknown orientation {orientation!r} (known: {sampler.ORIENTATIONS})')
  if image_size < generate.MIN_IMAGE_SIZE:
    raise ValueError(f'image_size must be at least {generate.MIN_IMAGE_SIZE}, got {image_size}')
  if num_train < 0 or num_eval < 0 or num_train + num_eval == 0:
    raise ValueError(f'need non-negative split sizes, not both 0: {num_train}, {num_eval}')
  if seed < 0:
    raise ValueError(f'seed must be non-negative, got {seed}')
  hand = hand_fingerprint(hand_model, tip_ids)
  name = (
      f'px{image_size}_train{num_train}_eval{num_eval}_seed{seed}_hand{hand}'
      + ('_depth' if with_depth else '')
      + ('' if orientation == 'held' else f'_{orientation}')
  )
  return SyntheticHandsConfig(
      name=name,
      version=SyntheticHands.VERSION,
      image_size=int(image_size),
      num_train=int(num_train),
      num_eval=int(num_eval),
      seed=int(seed),
      with_depth=bool(with_depth),
      hand=hand,
      tip_ids=tuple(int(t) for t in tip_ids),
      orientation=orientation,
      description=f'{image_size}px, {num_train} train / {num_eval} evaluation, seed {seed}',
  )


class SyntheticHands(tfds.core.GeneratorBasedBuilder):
  """Synthetic rendered hands; construct with `config=make_config(...)` and `hand_model`."""

  # Bump whenever the generator's output changes for the same parameters (sampler, renderer,
  # appearance): prepared data of an older version is then never reused by mistake.
  VERSION = tfds.core.Version('2.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'First release.',
      '2.0.0': 'Hands held up to the camera; lighter palm, nails, skin texture.',
  }

  def __init__(self, *, hand_model=None, num_workers=None, **kwargs):
    """`hand_model` is needed only to generate (not to read a prepared data set).

    `num_workers`: processes that render a large split (None = every core; the data do not
    depend on it, see `render_pool.render_split`).
    """
    if not isinstance(kwargs.get('config'), SyntheticHandsConfig):
      raise ValueError('synthetic_hands needs config=make_config(...) (or use prepare(config))')
    self._hand_model = hand_model
    self._num_workers = num_workers
    super().__init__(**kwargs)

  def _info(self):
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=features.hand_features(with_depth=self.builder_config.with_depth),
        homepage='https://github.com/',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    config = self.builder_config
    if self._hand_model is None:
      raise ValueError('synthetic_hands: pass hand_model=... to generate the data')
    if hand_fingerprint(self._hand_model, config.tip_ids) != config.hand:
      raise ValueError(
          'synthetic_hands: hand_model does not match the config fingerprint ' f'{config.hand}'
      )
    sizes = {'train': config.num_train, 'evaluation': config.num_eval}
    return {
        split: self._generate_examples(split, count) for split, count in sizes.items() if count > 0
    }

  def _generate_examples(self, split, count):
    config = self.builder_config
    spec = render_pool.SplitSpec(
        seed=config.seed,
        stream=SPLIT_STREAMS[split],
        image_size=config.image_size,
        tip_ids=tuple(config.tip_ids),
        orientation=config.orientation,
        with_depth=config.with_depth,
    )
    progress_every = max(1, min(500, count // 10))
    started = time.perf_counter()
    examples = render_pool.render_split(self._hand_model, spec, count, self._num_workers)
    for done, (key, example) in enumerate(examples, start=1):
      yield key, example
      if done % progress_every == 0 or done == count:
        rate = done / max(time.perf_counter() - started, 1e-9)
        print(
            f'synthetic_hands/{config.name} {split}: {done}/{count} examples, '
            f'{rate:.1f} examples/s',
            file=sys.stderr,
            flush=True,
        )


def builder_for(config, num_train=None):
  """The `SyntheticHands` builder of an experiment config (not prepared).

  Args:
    config: experiment ConfigDict (`seed`, `mano_path`, `mano_seed`, `tip_vertex_ids`,
      `data.num_train`, `data.num_eval`, `data.render_size`, `model.use_depth`,
      `data.orientation`, `data.tfds_data_dir`).
    num_train: training-split size; None = config.data.num_train.
  """
  hand_model = procedural_mano.load_hand_model(config)
  tip_ids = tuple(config.tip_vertex_ids)
  num_train = config.data.num_train if num_train is None else num_train
  builder_config = make_config(
      hand_model,
      config.data.render_size,
      num_train,
      config.data.num_eval,
      config.seed,
      config.model.use_depth,
      tip_ids,
      config.data.orientation,
  )
  return SyntheticHands(
      config=builder_config, data_dir=config.data.tfds_data_dir, hand_model=hand_model
  )


def prepare(config, need_train=True):
  """Builds the synthetic data set of `config` into its data_dir if missing; returns the builder.

  With need_train=False (evaluation only, e.g. hands of a seed never trained on) the full
  data set is used when it is prepared already, else one with an empty training split is made.
  Progress (examples/s) goes to stderr while generating.
  """
  builder = builder_for(config)
  if not need_train and not builder.is_prepared():
    builder = builder_for(config, num_train=0)
  if not builder.is_prepared():
    print(
        f'preparing {builder.name}/{builder.builder_config.name} in {builder.data_dir}',
        file=sys.stderr,
        flush=True,
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
  return builder
