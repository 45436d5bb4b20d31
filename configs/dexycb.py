"""DexYCB (S0 split, unannotated frames filtered as in HandOccNet): HRNet-W64, 256 px.

  python launch.py --config=configs/dexycb.py --config.data.root=/data/dex-ycb \
      --config.mano_path=/models/mano/MANO_RIGHT.pkl \
      --config.model.pretrained_path=/models/hrnet_w64.safetensors \
      --config.model.hrnet_norm=frozen_bn --workdir=runs/dexycb
MANO_LEFT.pkl must sit beside MANO_RIGHT.pkl (left hands). Files and protocol:
docs/DATASETS.md. The input size is our choice (HandOccNet's 256 px; the paper's value was
lost, and DESIGN §6 fixes 224 px only for FreiHAND and HO-3D).
"""

from configs import common

# Approximate size of the filtered S0 training split, for the config's first estimate only:
# training counts the prepared split (written from your files) and sets the steps for
# config.train.num_epochs from that count (train.resolve_epochs). To see it beforehand:
#   python -m datasets.dexycb.reader count /data/dex-ycb train
NUM_TRAIN_IMAGES = 406_888


def get_config(arg=None):
  return common.paper_config(
      dataset='dexycb',
      num_train_images=NUM_TRAIN_IMAGES,
      encoder='hrnet',
      encoder_size='w64',
      image_size=256,
      arg=arg,
  )
