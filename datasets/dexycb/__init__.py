"""DexYCB: the numpy reader (`examples`, no TensorFlow), metrics, and the TFDS builder
(`dexycb.py`; import it explicitly so reading the raw files never needs TensorFlow)."""

from datasets.dexycb.evaluation import dexycb_metrics
from datasets.dexycb.reader import count_annotated
from datasets.dexycb.reader import examples
from datasets.dexycb.reader import num_frames
from datasets.dexycb.reader import SERIALS
from datasets.dexycb.reader import SETUPS
from datasets.dexycb.reader import SUBJECTS
