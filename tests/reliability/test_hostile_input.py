"""Issue 13: hostile and broken input files, and bad arguments to the sampling API.

MANO pickles and `.npz` files, pretrained weights (`.safetensors`, `.msgpack`), images for
--mode=predict, and `sampling.sample`: each bad input gets a ValueError (FileNotFoundError for
a missing file) naming the file, nothing in a file is executed, and nothing exhausts memory.
tests/test_mano.py has the first payloads (os.system, eval, exec, Popen, _reconstructor).
"""

import copyreg
import importlib
import io
import os
import pickle
import struct
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from safetensors import numpy as safetensors_numpy

from configs import synthetic
from diffhand_jax import mano
from diffhand_jax import models
from diffhand_jax import predict
from diffhand_jax import procedural_mano
from diffhand_jax import sampling
from diffhand_jax import weights
from encoder_testing import model_config

FUZZ_ITERATIONS = 200


@pytest.fixture(scope='module')
def hand():
  return procedural_mano.procedural_hand(0)


@pytest.fixture(scope='module')
def hand_pickle(hand, tmp_path_factory):
  path = tmp_path_factory.mktemp('mano') / 'MANO_RIGHT.pkl'
  mano.save_mano(hand, path)
  return path.read_bytes()


class Payload:
  """Pickles as `call(*args)`."""

  def __init__(self, call, *args):
    self.call, self.args = call, args

  def __reduce__(self):
    return (self.call, self.args)


class NestedPayload:
  """A harmless-looking object whose state hides a payload one level down."""

  def __init__(self, inner):
    self.inner = inner

  def __reduce__(self):
    return (copyreg._reconstructor, (NestedPayload, object, None), {'inner': self.inner})


def marker_payloads(marker):
  touch = f"open({str(marker)!r}, 'w').close()"
  return {
      'os.system': Payload(os.system, f'touch {marker}'),
      'subprocess.run': Payload(__import__('subprocess').run, ['touch', str(marker)]),
      'subprocess.check_call': Payload(__import__('subprocess').check_call, ['touch', str(marker)]),
      'builtins.eval': Payload(eval, touch),
      'builtins.exec': Payload(exec, touch),
      'builtins.getattr': Payload(getattr, Payload(__import__, 'os'), 'system'),
      'builtins.__import__': Payload(__import__, 'os'),
      'importlib.import_module': Payload(importlib.import_module, 'os'),
      # The payload nested inside an allowed reconstructor's state.
      'nested __reduce__': NestedPayload(Payload(os.system, f'touch {marker}')),
      # numpy's (allowed) array reconstructor, asked for a subtype that is a payload.
      'ndarray subtype': Payload(
          np._core.multiarray._reconstruct, Payload(os.system, f'touch {marker}'), (0,), b'b'
      ),
  }


PAYLOAD_NAMES = list(marker_payloads('x'))


@pytest.mark.parametrize('name', PAYLOAD_NAMES)
def test_payload_pickles_are_refused_and_not_run(hand, tmp_path, name):
  marker = tmp_path / 'MARKER'
  data = {'v_template': np.asarray(hand.v_template), 'weights': marker_payloads(marker)[name]}
  path = tmp_path / 'evil.pkl'
  path.write_bytes(pickle.dumps(data, protocol=2))
  with pytest.raises(ValueError, match=f'{path}: refusing') as raised:
    mano.load_mano(path)
  assert not marker.exists()
  print(name, '->', raised.value)


@pytest.mark.parametrize(
    'name,data',
    [
        # protocol 0 (GLOBAL + REDUCE), protocol 4 (STACK_GLOBAL), a pickled INST
        ('protocol 0', b"cos\nsystem\n(S'touch MARKER'\ntR."),
        ('stack_global', b'\x80\x04\x8c\x02os\x8c\x06system\x93\x8c\x04echo\x85R.'),
        ('inst', b"(S'touch MARKER'\nios\nsystem\n."),
        ('persistent id', b'\x80\x02P0\n.'),
    ],
)
def test_hand_written_opcodes_are_refused(tmp_path, name, data):
  path = tmp_path / 'evil.pkl'
  path.write_bytes(data)
  with pytest.raises(ValueError, match=f'{path}: refusing'):
    mano.load_mano(path)
  assert not (tmp_path / 'MARKER').exists()


@pytest.mark.parametrize(
    'name,data,reason',
    [
        # A bytes object declared 2**60 long (protocol 4 BINBYTES8): no allocation, no hang.
        ('binbytes8', b'\x80\x04\x8e' + struct.pack('<Q', 2**60) + b'abc', 'not a readable'),
        ('binunicode8', b'\x80\x04\x8d' + struct.pack('<Q', 2**40) + b'abc', 'not a readable'),
        ('binbytes 2 GiB', b'\x80\x03B' + struct.pack('<I', 2**31 - 1) + b'abc', 'truncated'),
        ('deep nesting', b'\x80\x02' + b'(' * 100000 + b'l' * 100000 + b'.', 'expected a dict'),
        ('empty', b'', 'not a readable'),
        ('not a pickle', b'hello world', 'not a readable'),
    ],
)
def test_huge_declared_sizes_and_junk_are_refused(tmp_path, name, data, reason):
  path = tmp_path / 'bad.pkl'
  path.write_bytes(data)
  with pytest.raises(ValueError, match=str(path)) as raised:
    mano.load_mano(path)
  if reason:
    assert reason in str(raised.value)


def test_array_state_with_a_huge_shape_is_refused(tmp_path):
  """numpy's __setstate__ with shape (2**40, 2**12) and 16 bytes: refused, nothing allocated."""

  class HugeArray:

    def __reduce__(self):
      return (
          np._core.multiarray._reconstruct,
          (np.ndarray, (0,), b'b'),
          (1, (2**40, 2**12), np.dtype('float64'), False, b'\x00' * 16),
      )

  path = tmp_path / 'huge.pkl'
  path.write_bytes(pickle.dumps({'v_template': HugeArray()}, protocol=2))
  with pytest.raises(ValueError, match=f'{path}: .*size'):
    mano.load_mano(path)


@pytest.mark.parametrize('keep', [0.1, 0.5, 0.9, 0.999])
def test_truncated_pickles_name_the_file(hand_pickle, tmp_path, keep):
  path = tmp_path / 'truncated.pkl'
  path.write_bytes(hand_pickle[: int(len(hand_pickle) * keep)])
  with pytest.raises(ValueError, match=f'{path}: not a readable MANO pickle'):
    mano.load_mano(path)


def npy_bytes(shape, dtype, data: bytes):
  """An .npy member whose header declares `shape` but holds only `data`."""
  buffer = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      buffer, {'descr': np.dtype(dtype).str, 'fortran_order': False, 'shape': shape}
  )
  return buffer.getvalue() + data


@pytest.mark.parametrize(
    'shape', [(778, 3), (2**40, 2**12)], ids=['too little data', 'declares 32 PiB']
)
def test_npz_with_too_little_data_names_the_file(hand, tmp_path, shape):
  path = tmp_path / 'short.npz'
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('v_template.npy', npy_bytes(shape, np.float64, b'\x00' * 64))
    archive.writestr('f.npy', npy_bytes((1538, 3), np.uint32, np.asarray(hand.faces).tobytes()))
  with pytest.raises(ValueError, match=f'{path}: not a readable .npz file'):
    mano.load_mano(path)


def fuzz(valid: bytes, path, load, allowed, seed):
  """FUZZ_ITERATIONS loads of `valid` with 1-16 random bytes replaced; returns the outcomes.

  Every failure must be one of `allowed` and name the file."""
  rng = np.random.default_rng(seed)
  outcomes = {}
  for _ in range(FUZZ_ITERATIONS):
    data = bytearray(valid)
    for position in rng.integers(0, len(data), rng.integers(1, 17)):
      data[position] = rng.integers(0, 256)
    path.write_bytes(bytes(data))
    try:
      load(path)
      outcome = 'loaded'
    except allowed as e:
      assert str(path) in str(e), repr(e)
      outcome = type(e).__name__
    outcomes[outcome] = outcomes.get(outcome, 0) + 1
  return outcomes


def test_fuzzed_mano_pickles_raise_only_value_errors(hand_pickle, tmp_path):
  marker = tmp_path / 'MARKER'
  outcomes = fuzz(hand_pickle, tmp_path / 'fuzz.pkl', mano.load_mano, ValueError, seed=13)
  print('MANO pickle fuzz:', outcomes)
  assert sum(outcomes.values()) == FUZZ_ITERATIONS and outcomes.get('ValueError', 0) > 0
  assert not marker.exists()


def test_fuzzed_mano_npz_raise_only_value_errors(hand, tmp_path):
  path = tmp_path / 'hand.npz'
  mano.save_mano(hand, path)
  outcomes = fuzz(path.read_bytes(), tmp_path / 'fuzz.npz', mano.load_mano, ValueError, seed=14)
  print('MANO npz fuzz:', outcomes)
  assert outcomes.get('ValueError', 0) > 0


# ---- Pretrained weights: .safetensors and .msgpack ----
@pytest.fixture(scope='module')
def micro_vit():
  return model_config('vit', 'micro', pretrained_image_size=64)


def test_fuzzed_and_truncated_safetensors_raise_value_errors(tmp_path):
  rng = np.random.default_rng(0)
  state = {f'blocks.{i}.norm1.weight': rng.normal(size=(64,)).astype(np.float32) for i in range(4)}
  valid = tmp_path / 'valid.safetensors'
  safetensors_numpy.save_file(state, os.fspath(valid))
  data = valid.read_bytes()
  truncated = tmp_path / 'truncated.safetensors'
  truncated.write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match=f'{truncated}: not a readable .safetensors file'):
    weights.read_state_dict(truncated)
  huge_header = tmp_path / 'huge.safetensors'
  huge_header.write_bytes(struct.pack('<Q', 2**62) + b'{}')
  with pytest.raises(ValueError, match=f'{huge_header}: not a readable'):
    weights.read_state_dict(huge_header)
  outcomes = fuzz(data, tmp_path / 'fuzz.safetensors', weights.read_state_dict, ValueError, seed=15)
  print('safetensors fuzz:', outcomes)
  assert outcomes.get('ValueError', 0) > 0


def test_fuzzed_and_truncated_msgpack_raise_loader_errors(tmp_path, micro_vit):
  shapes = weights.expected_shapes(micro_vit)
  params = {}
  for path, shape in shapes.items():
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.zeros(shape, np.float32)
  valid = tmp_path / 'enc.msgpack'
  weights.save_msgpack(params, valid)
  weights.load_timm_checkpoint(valid, micro_vit)  # the valid file loads
  data = valid.read_bytes()
  truncated = tmp_path / 'truncated.msgpack'
  truncated.write_bytes(data[: len(data) // 3])
  with pytest.raises(ValueError, match=f'{truncated}: not a readable .msgpack file'):
    weights.load_timm_checkpoint(truncated, micro_vit)
  # A flipped byte may also leave a readable file with a wrong key or shape: KeyError and
  # ValueError, both naming the file, are the loader's documented errors.
  outcomes = fuzz(
      data,
      tmp_path / 'fuzz.msgpack',
      lambda p: weights.load_timm_checkpoint(p, micro_vit),
      (ValueError, KeyError),
      seed=16,
  )
  print('msgpack fuzz:', outcomes)
  assert outcomes.get('ValueError', 0) > 0


# ---- --mode=predict: huge images ----
def test_huge_png_is_refused_before_decoding(tmp_path):
  path = tmp_path / 'huge.png'
  Image.new('1', (8000, 8000)).save(path)  # 8 MB of pixels in memory, a few kB on disk
  with pytest.raises(ValueError, match=f'{path}.*8000 x 8000 pixels is larger than predict'):
    predict.read_image(os.fspath(path))


def test_huge_jpeg_is_decoded_downscaled(tmp_path):
  path = tmp_path / 'huge.jpg'
  Image.new('L', (8000, 6000), 128).save(path, quality=50)
  image = predict.read_image(os.fspath(path))
  assert image.shape == (3000, 4000, 3) and image.dtype == np.uint8
  assert image.shape[0] * image.shape[1] <= predict.MAX_IMAGE_PIXELS
  # Below the limit, nothing changes.
  small = tmp_path / 'small.jpg'
  Image.new('RGB', (640, 480)).save(small)
  assert predict.read_image(os.fspath(small)).shape == (480, 640, 3)


def test_non_image_files_are_refused_naming_them(tmp_path):
  path = tmp_path / 'notes.jpg'
  path.write_text('not an image')
  with pytest.raises(ValueError, match='cannot read image .*notes.jpg'):
    predict.read_image(os.fspath(path))


@pytest.mark.parametrize(
    'name,data',
    [
        ('empty.png', b''),
        ('text.jpg', b'just some words'),
        ('truncated.png', b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00'),
        ('archive.jpeg', b'PK\x03\x04' + bytes(64)),
    ],
)
def test_non_image_content_behind_an_image_name_is_refused_naming_it(tmp_path, name, data):
  (tmp_path / name).write_bytes(data)
  with pytest.raises(ValueError, match=f'cannot read image .*{name}'):
    predict.read_image(os.fspath(tmp_path / name))


def test_predict_folder_lists_only_image_files(tmp_path):
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'hand.PNG')
  (tmp_path / 'notes.txt').write_text('x')
  (tmp_path / 'model.pkl').write_bytes(b'\x80\x04N.')
  (tmp_path / 'folder.jpg').mkdir()  # a folder with an image name
  assert predict.list_images(os.fspath(tmp_path)) == [os.fspath(tmp_path / 'hand.PNG')]


# ---- sampling.sample: bad arguments fail before anything is traced ----
@pytest.fixture(scope='module')
def smoke_model():
  return models.build_model(synthetic.get_config('smoke'))


@pytest.mark.parametrize(
    'images,pattern',
    [
        (jnp.zeros((0, 64, 64, 3)), 'batch of 0'),
        (jnp.full((1, 64, 64, 3), jnp.nan), 'images contains NaN'),
        (np.full((1, 64, 64, 3), np.inf, np.float64), 'images contains NaN or infinite'),
        (jnp.zeros((1, 64, 64, 3), jnp.uint8), 'images must be floating, got uint8'),
        (np.zeros((1, 64, 64, 3), np.int32), 'images must be floating, got int32'),
        (jnp.zeros((64, 64, 3)), 'images must have shape'),
        (jnp.zeros((1, 64, 64, 4)), 'images must have shape'),
        (
            jnp.zeros((1, 32, 32, 3)),
            r'images must have shape \[batch, 64, 64, 3\], got \(1, 32, 32, 3\)',
        ),
        (
            jnp.zeros((1, 64, 48, 3)),
            r'images must have shape \[batch, 64, 64, 3\], got \(1, 64, 48',
        ),
    ],
    ids=[
        'empty batch',
        'NaN',
        'inf float64',
        'uint8',
        'int32',
        'no batch axis',
        '4 channels',
        'another size than the model',
        'not square',
    ],
)
def test_sample_rejects_bad_images(smoke_model, images, pattern):
  with pytest.raises(ValueError, match=pattern):
    sampling.sample(smoke_model, {}, images, jax.random.key(0), num_sampling_steps=2)
