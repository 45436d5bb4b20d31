"""HO-3D v2: DeiT-Large at 224 px; variant 'depth' is the depth fine-tuning stage.

  python launch.py --config=configs/ho3d.py --config.data.root=... --workdir=runs/ho3d
  python launch.py --config=configs/ho3d.py:depth --config.init_from=runs/ho3d ...
Also --config.mano_path=/models/mano/MANO_RIGHT.pkl, and for an ImageNet-pretrained DeiT
--config.model.pretrained_path=deit_large.safetensors; files and protocol: docs/DATASETS.md.
"""

from configs import common

NUM_TRAIN_IMAGES = 66_034  # HO-3D v2 training images
FINETUNE_EPOCHS = 5


def get_config(arg=None):
  variant = arg or ''
  depth = variant.startswith('depth')
  base_arg = variant[len('depth') :].lstrip(',') if depth else variant
  config = common.paper_config(
      dataset='ho3d',
      num_train_images=NUM_TRAIN_IMAGES,
      encoder='deit',
      encoder_size='large',
      image_size=224,
      arg=base_arg or None,
  )
  if depth:
    config = common.depth_finetune(
        config,
        base_workdir='runs/ho3d',
        epochs=FINETUNE_EPOCHS,
        num_train_images=NUM_TRAIN_IMAGES,
        smoke=base_arg == 'smoke',
    )
  return config
