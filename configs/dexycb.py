"""DexYCB (S0 split, invalid samples filtered as in HandOccNet): HRNet-W64, 256 px.

The reader is not written yet: training stops with a clear error (planned issue).
The input size is our choice (HandOccNet's 256 px; the paper's value was lost, and
DESIGN §6 fixes 224 px only for FreiHAND and HO-3D).
"""
from configs import common

# Approximate size of the filtered S0 training split; only turns 100 epochs
# into steps. Recompute from the reader when it lands.
NUM_TRAIN_IMAGES = 406_888


def get_config(arg=None):
  return common.paper_config(
      dataset='dexycb', num_train_images=NUM_TRAIN_IMAGES, encoder='hrnet',
      encoder_size='w64', image_size=256, arg=arg)
