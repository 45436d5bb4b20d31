"""FreiHAND: the numpy reader (`examples`, no TensorFlow) and the TFDS builder (`freihand.py`).

Import the builder explicitly (`from datasets.freihand import freihand`) so that reading the raw
files never needs TensorFlow.
"""

from datasets.freihand.reader import CorruptFileError
from datasets.freihand.reader import examples
from datasets.freihand.reader import load_annotations
from datasets.freihand.reader import VERSIONS
