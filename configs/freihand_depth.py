"""FreiHAND depth fine-tuning: the freihand.py model plus the zero-init depth branch.

Starts from a trained configs/freihand.py run (its params; the depth branch
starts at zero) and fine-tunes for a few epochs with depth maps from
--config.data.root (MiDaS-style maps mirroring the images, DESIGN §4):
  python launch.py --config=configs/freihand_depth.py --config.data.root=... \
      --config.init_from=runs/freihand --workdir=runs/freihand_depth
"""

from configs import common
from configs import freihand

FINETUNE_EPOCHS = 5


def get_config(arg=None):
  return common.depth_finetune(
      freihand.get_config(arg),
      base_workdir='runs/freihand',
      epochs=FINETUNE_EPOCHS,
      num_train_images=freihand.NUM_TRAIN_IMAGES,
      smoke=arg == 'smoke',
  )
