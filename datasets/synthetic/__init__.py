"""Synthetic rendered hands: sampler, example generator (numpy) and the TFDS builder.

`generate.examples` / `generate.make_example` need no TensorFlow; the TFDS builder
`synthetic_hands.SyntheticHands` and `synthetic_hands.prepare(config)` live in
`synthetic_hands.py` (import it explicitly: it imports TensorFlow).
"""

from datasets.synthetic.generate import examples
from datasets.synthetic.generate import make_example
