"""HO-3D v2: the numpy reader (`examples`, no TensorFlow), the submission writer, and the TFDS
builder (`ho3d.py`; import it explicitly so reading the raw files never needs TensorFlow)."""

from datasets.ho3d.reader import examples
from datasets.ho3d.reader import flip
from datasets.ho3d.reader import frame_list
from datasets.ho3d.reader import FREIHAND_TO_HO3D
from datasets.ho3d.reader import HO3D_TO_FREIHAND
from datasets.ho3d.reader import submission_arrays
from datasets.ho3d.reader import write_submission
