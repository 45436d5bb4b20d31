"""FreiHAND, the paper's recipe: DeiT-Large at 224 px, 100 epochs, batch 64, TTA.

Usage:
  python launch.py --config=configs/freihand.py --config.data.root=/data/FreiHAND_pub_v2 \
      --workdir=runs/freihand
  python launch.py --config=configs/freihand.py:smoke --config.data.root=...  # wiring check
"""

from configs import common

# 32,560 annotations x 4 image versions (DESIGN §7).
NUM_TRAIN_IMAGES = 130_240


def get_config(arg=None):
  return common.paper_config(
      dataset='freihand',
      num_train_images=NUM_TRAIN_IMAGES,
      encoder='deit',
      encoder_size='large',
      image_size=224,
      arg=arg,
      tta_angles=common.FREIHAND_TTA_ANGLES,
  )
