"""The paper's training recipe (DESIGN §6), shared by the real-data configs.

Each real-data config file is a few lines on top of `paper_config`; the schema
itself is configs/synthetic.py's (one source of every key).
"""

import math

from configs import synthetic

PAPER_GLOBAL_BATCH = 64
PAPER_EPOCHS = 100
PAPER_LEARNING_RATE = 1e-4  # the paper's value was lost in extraction (DESIGN §6)
PAPER_WEIGHT_DECAY = 1e-4
FREIHAND_TTA_ANGLES = (-10.0, 0.0, 10.0)  # MeshGraphormer-style rotations


def steps_for(num_images: int, epochs: float, batch_size: int) -> int:
  """Optimiser steps for `epochs` passes over `num_images` at `batch_size`."""
  return int(math.ceil(epochs * num_images / batch_size))


def epoch_schedule(config, num_train_images: int):
  """Sets the step counts of `config` from config.train.num_epochs and the training-set size.

  num_steps = ceil(epochs * images / batch); warm-up = min(one epoch, num_steps // 10); a
  checkpoint every epoch and an evaluation every 10 epochs. Pure Python (config files load
  it before JAX is imported).
  """
  epochs, batch = float(config.train.num_epochs), int(config.train.global_batch_size)
  if epochs <= 0 or num_train_images <= 0:
    raise ValueError(
        f'epoch_schedule needs num_epochs > 0 and training images > 0, got {epochs} and '
        f'{num_train_images}'
    )
  steps_per_epoch = steps_for(num_train_images, 1, batch)
  config.train.num_steps = steps_for(num_train_images, epochs, batch)
  config.optim.warmup_steps = min(steps_per_epoch, config.train.num_steps // 10)
  config.train.checkpoint_every = steps_per_epoch
  config.train.eval_every = 10 * steps_per_epoch


def paper_config(
    *,
    dataset: str,
    num_train_images: int,
    encoder: str,
    encoder_size: str,
    image_size: int,
    arg=None,
    epochs: float = PAPER_EPOCHS,
    tta_angles=(),
):
  """The DESIGN §6 recipe on a real data set.

  AdamW, lr 1e-4 with one epoch of linear warmup then cosine decay to 0 (the
  warmup length is our choice: the paper does not give it), weight decay 1e-4,
  global batch 64, `epochs` epochs expressed in steps, DDIM 10 steps.
  data.root is left empty: pass --config.data.root=/path/to/<dataset>.

  Args:
    dataset: config.data.name.
    num_train_images: size of the training split (to turn epochs into steps).
    encoder: 'deit' | 'hrnet'; encoder_size: 'large' | 'w64' ...
    image_size: network input size (px).
    arg: None for the real setting, or 'smoke' (a tiny model and 4 steps on
      the same data, to check a data set is wired up).
  """
  config = synthetic.get_config()
  config.data.name = dataset
  config.data.root = ''
  config.data.image_size = image_size
  config.data.update(synthetic.CROP_AUGMENTATION)
  config.model.encoder = encoder
  config.model.encoder_size = encoder_size
  config.model.pretrained_image_size = 224
  # The accelerator setting: plain JAX layers, tree-shaped state, no CPU tools.
  config.model.cpu_kernels = False
  config.train.flat_state = False
  config.train.step_cache = False
  config.optim.learning_rate = PAPER_LEARNING_RATE
  config.optim.weight_decay = PAPER_WEIGHT_DECAY
  config.train.global_batch_size = PAPER_GLOBAL_BATCH
  config.train.num_epochs = float(epochs)
  # An estimate until training counts the prepared training split (train.py calls
  # epoch_schedule again with that count).
  epoch_schedule(config, num_train_images)
  config.train.log_every = 100
  config.sampling.num_sampling_steps = 10
  config.sampling.smoothing_iterations = 0  # the paper's raw decoder output
  config.eval.tta_angles = tuple(tta_angles)

  if arg == 'smoke':
    smoke = synthetic.get_config('smoke')
    config.data.image_size = 64
    config.model.encoder = smoke.model.encoder
    config.model.encoder_size = smoke.model.encoder_size
    config.model.update({k: smoke.model[k] for k in ('width', 'num_heads', 'num_blocks')})
    config.sampling.num_sampling_steps = smoke.sampling.num_sampling_steps
    config.train.update(smoke.train)
    config.optim.warmup_steps = smoke.optim.warmup_steps
    config.eval.batch_size = smoke.eval.batch_size
    config.eval.num_examples = 16
    config.eval.tta_angles = tuple(tta_angles)[:2]
  elif arg not in (None, ''):
    raise ValueError(f'unknown variant {arg!r} of the {dataset} config ' '(known: smoke)')
  return config


def depth_finetune(
    config,
    *,
    base_workdir: str,
    epochs: float,
    num_train_images: int,
    smoke: bool = False,
    learning_rate: float = 1e-5,
):
  """Turns a base config into the depth fine-tuning stage (paper, §3 / DESIGN §4).

  The base run's params (no depth branch) are loaded by `init_from`; the depth
  branch starts from its zero init, so step 0 reproduces the base model. A few
  epochs at a lower learning rate (our choice; the paper gives none).
  """
  config.init_from = base_workdir  # or --config.init_from=runs/<base run>
  config.train.num_epochs = 0.0  # steps below from the written-down size (not recounted)
  config.model.use_depth = True  # the data carry depth maps too
  config.optim.learning_rate = learning_rate
  if not smoke:  # the smoke variant keeps its 4 steps
    config.train.num_steps = steps_for(num_train_images, epochs, config.train.global_batch_size)
    config.optim.warmup_steps = config.train.num_steps // 20
    config.train.eval_every = config.train.num_steps
  return config
