"""Renders a synthetic split in index order, on every CPU core when the split is large.

Each example is a pure function of (hand model, seed, stream, index), so chunks of indices can
be rendered in separate processes and joined in order: the stored data are the same whether
one process or several made them (tests/test_synthetic_data_tfds.py checks it). Workers are
spawned, not forked (the parent holds TensorFlow's threads). This module imports no
TensorFlow, but a spawned worker also re-imports the parent's main script: under launch.py
that brings TensorFlow in, a few seconds of start-up per worker.
"""

import collections
import dataclasses
import io
import itertools
import multiprocessing
import os

import numpy as np
from PIL import Image

from datasets.synthetic import generate
from diffhand_jax import checks

# Below this many examples a worker's start-up (imports, compiling the MANO forward, a few
# seconds) costs more than it saves.
MIN_PARALLEL_EXAMPLES = 512
CHUNK = 32  # examples per task: small enough for steady progress, large enough to amortise IPC
WINDOW_PER_WORKER = 4  # chunks in flight per worker (bounds the memory of rendered examples)


@dataclasses.dataclass(frozen=True)
class SplitSpec:
  """What one split's examples depend on besides the hand model (picklable)."""

  seed: int
  stream: int
  image_size: int
  tip_ids: tuple
  orientation: str
  with_depth: bool


def png_bytes(image):
  """Lossless PNG of a uint8 [H, W, 3] or [H, W, 1] array.

  Encoding with PIL here (TFDS stores the bytes as they are) is several times faster than
  TFDS's TensorFlow encoder, which runs eagerly once per image.
  """
  image = checks.check_array('image', image, ('H', 'W', None), kind=np.uint8)
  if image.shape[2] not in (1, 3):
    raise ValueError(f'image must have 1 or 3 channels, got shape {image.shape}')
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(
      buffer, format='PNG', compress_level=3
  )
  return buffer.getvalue()


def encoded_examples(hand_model, spec, start, count):
  """Examples [start, start + count) of a split as TFDS stores them.

  Returns:
    list of (key, example): key = the example's index; image and mask PNG-encoded bytes, depth
    left out unless `spec.with_depth`; otherwise `generate.make_example`'s dict.
  """
  encoded = []
  stream = generate.examples(
      hand_model,
      spec.seed,
      start,
      count,
      spec.image_size,
      spec.tip_ids,
      stream=spec.stream,
      orientation=spec.orientation,
  )
  for example in stream:
    if not spec.with_depth:
      del example['depth']
    example['image'] = png_bytes(example['image'])
    example['mask'] = png_bytes(example['mask'])
    encoded.append((int(example['id']), example))
  return encoded


def default_workers():
  """Worker processes to render with: the CPU cores this process may run on."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


_worker_hand_model = None


def _init_worker(hand_model):
  global _worker_hand_model
  _worker_hand_model = hand_model


def _render_chunk(task):
  spec, start, count = task
  return encoded_examples(_worker_hand_model, spec, start, count)


def render_split(hand_model, spec, count, num_workers=None, min_parallel=MIN_PARALLEL_EXAMPLES):
  """Yields (key, example) for indices 0 .. count - 1 in order (see `encoded_examples`).

  Args:
    hand_model: a `mano.ManoModel`.
    spec: a `SplitSpec`.
    count: number of examples.
    num_workers: processes; None = `default_workers()`. 1, or a split smaller than
      `min_parallel`, renders in this process.
    min_parallel: the smallest split rendered by a pool.
  """
  num_workers = default_workers() if num_workers is None else int(num_workers)
  if num_workers < 1:
    raise ValueError(f'num_workers must be at least 1, got {num_workers}')
  tasks = ((spec, start, min(CHUNK, count - start)) for start in range(0, count, CHUNK))
  if num_workers == 1 or count < min_parallel:
    for _, start, size in tasks:
      yield from encoded_examples(hand_model, spec, start, size)
    return
  context = multiprocessing.get_context('spawn')
  with context.Pool(num_workers, initializer=_init_worker, initargs=(hand_model,)) as pool:
    # A window of chunks in flight (not `pool.imap`, which queues every task at once and keeps
    # every finished chunk in memory while the consumer writes more slowly than workers render).
    pending = collections.deque(
        pool.apply_async(_render_chunk, (task,))
        for task in itertools.islice(tasks, WINDOW_PER_WORKER * num_workers)
    )
    while pending:
      chunk = pending.popleft().get()  # a worker's exception is raised here
      for task in itertools.islice(tasks, 1):
        pending.append(pool.apply_async(_render_chunk, (task,)))
      yield from chunk
