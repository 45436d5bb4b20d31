"""Models: encoders, the cross-modality decoder and the DiffHand model."""

from diffhand_jax.models.diffhand import build_model
from diffhand_jax.models.diffhand import init_params
