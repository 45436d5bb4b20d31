"""Pretrained encoder weights: timm-format checkpoints -> Flax params of our encoders.

Supported: timm's ViT / DeiT (`vit_*_patch16_*`, `deit_*`, `deit_*_distilled_*`) and HRNet
(`hrnet_w32`, `hrnet_w48`, `hrnet_w64`) state dicts, from a `.safetensors` file (read with
safetensors' numpy API, no torch needed) or a PyTorch `.pth` / `.pt` / `.bin` state dict (needs
torch). `.msgpack` files written by the `convert` CLI below load without either.

The conversion walks OUR parameter tree (from `jax.eval_shape` of the encoder that
`encoder.build_encoder(model_config)` makes) and looks every leaf up in the state dict under
the timm name it corresponds to (the names are listed in vit.py and hrnet.py). Nothing is
silently ignored:
- a leaf whose timm key is absent -> KeyError naming both names;
- a shape that differs -> ValueError naming the key and both shapes;
- a state-dict key that no leaf consumed and that is not on the short list of parts we
  drop by design (classifier heads, HRNet's classification head and the three coarse fused
  outputs of its last module, BatchNorm's `num_batches_tracked`) -> ValueError listing them;
- the only leaves that may stay un-loaded are the depth branch (`depth/...`, no timm
  counterpart; it keeps its zero init).

ViT position embeddings: a checkpoint whose grid differs from the config's
`pretrained_image_size // patch_size` grid is resampled to it (bicubic, antialiased, as
timm's `resample_abs_pos_embed`); inputs of yet another size are resampled on the fly by
the model itself.

HRNet: timm's HRNet uses BatchNorm. Imported weights need `model.hrnet_norm = 'frozen_bn'`
(hrnet.py), whose norm layers are a per-channel affine map y = scale * x + bias; each
BatchNorm's running statistics are folded into it at import:
  scale = gamma / sqrt(running_var + eps),  bias = beta - running_mean * scale  (eps = 1e-5),
which is exactly BatchNorm in eval mode. See hrnet.py for why the statistics are folded
rather than kept as a mutable BatchNorm state.

CLI (convert once; training then needs neither torch nor safetensors' torch side):
  python -m diffhand_jax.weights convert deit_tiny.safetensors deit_tiny.msgpack \
      --config=configs/freihand.py [--config.model.encoder_size=tiny ...]
Then set `--config.model.pretrained_path=deit_tiny.msgpack` (a `.safetensors` file works
there directly too).
"""

import math
import os
import pathlib
import re
from typing import Any, Callable, Dict, Iterable, Mapping, Tuple

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import numpy as safetensors_numpy

from diffhand_jax.models import encoder as encoder_lib
from diffhand_jax.models import hrnet
from diffhand_jax.models import vit

Params = Dict[str, Any]
StateDict = Dict[str, np.ndarray]
Path = Tuple[str, ...]

# BatchNorm2d's default epsilon (timm's HRNet does not change it).
BATCH_NORM_EPS = 1e-5
TORCH_SUFFIXES = ('.pth', '.pt', '.bin')
# State-dict keys dropped by design (see the module docstring), per encoder family.
_VIT_UNUSED = (r'head\.(weight|bias)', r'head_dist\.(weight|bias)')
_HRNET_UNUSED = (
    r'incre_modules\..*',
    r'downsamp_modules\..*',
    r'final_layer\..*',
    r'classifier\.(weight|bias)',
    r'.*\.num_batches_tracked',
)


# ---- Reading checkpoint files ----
def read_state_dict(path: str) -> StateDict:
  """Reads a timm-format state dict as float32 numpy arrays.

  Args:
    path: a `.safetensors` file, or a PyTorch `.pth` / `.pt` / `.bin` state dict (torch
      needed; a dict wrapping the weights under 'state_dict' or 'model' is unwrapped).
  Returns:
    {timm key: float32 array}; a leading 'module.' (DataParallel) is stripped.
  Raises:
    FileNotFoundError, ValueError (unknown suffix), ImportError (torch missing for .pth).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'pretrained checkpoint not found: {path}')
  if path.suffix == '.safetensors':
    try:
      raw = safetensors_numpy.load_file(os.fspath(path))
    except Exception as e:  # a corrupt or truncated file: SafetensorError, OSError, ...
      raise ValueError(f'{path}: not a readable .safetensors file ({type(e).__name__}: {e})') from e
  elif path.suffix in TORCH_SUFFIXES:
    raw = _read_torch_state_dict(path)
  else:
    raise ValueError(
        f'{path}: unknown checkpoint format {path.suffix!r}; expected '
        f'.safetensors, {", ".join(TORCH_SUFFIXES)} or a converted .msgpack'
    )
  state_dict = {}
  for key, value in raw.items():
    key = key[len('module.') :] if key.startswith('module.') else key
    state_dict[key] = np.asarray(value, dtype=np.float32)
  return state_dict


def _read_torch_state_dict(path: pathlib.Path) -> Dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top  (optional extra: only .pth/.bin need it)
  except ImportError as e:
    raise ImportError(
        f'{path}: reading a PyTorch checkpoint needs torch (make venv-torch, or convert the '
        'file to .safetensors elsewhere: safetensors.torch.save_file(state_dict, ...))'
    ) from e
  # weights_only=True: tensors and plain containers only, no arbitrary code from the file.
  raw = torch.load(path, map_location='cpu', weights_only=True)
  for wrapper in ('state_dict', 'model'):
    if isinstance(raw, Mapping) and wrapper in raw and isinstance(raw[wrapper], Mapping):
      raw = raw[wrapper]
  if not isinstance(raw, Mapping):
    raise ValueError(f'{path}: expected a state dict, got {type(raw).__name__}')
  return {k: v.detach().float().numpy() for k, v in raw.items() if hasattr(v, 'detach')}


# ---- Expected parameter tree ----
def expected_shapes(model_config) -> Dict[Path, Tuple[int, ...]]:
  """{flattened param path: shape} of the encoder `build_encoder(model_config)` makes."""
  module = encoder_lib.build_encoder(model_config)
  if model_config.encoder == 'hrnet':
    size = 64  # any multiple of 32: HRNet's parameters do not depend on the input size
  else:
    size = model_config.pretrained_image_size
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  depth = jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32) if model_config.use_depth else None
  variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), images, depth)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables['params']))
  return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def _is_depth_branch(path: Path) -> bool:
  return path[0] == 'depth'


# ---- Conversion ----
def _dense(w):
  return w.T


def _conv(w):
  return w.transpose(2, 3, 1, 0)  # torch [out, in, kh, kw] -> flax [kh, kw, in, out]


def _identity(w):
  return w


class _Converter:
  """Takes keys out of a state dict, checks shapes and remembers what it used."""

  def __init__(self, state_dict: StateDict, source: str):
    self.state_dict = state_dict
    self.source = source
    self.used = set()

  def take(self, key: str, path: Path) -> np.ndarray:
    if key not in self.state_dict:
      raise KeyError(
          f'{self.source}: key {key!r} (for our parameter {"/".join(path)}) is '
          'not in the checkpoint: is it the architecture that config.model names?'
      )
    self.used.add(key)
    return self.state_dict[key]

  def check(self, key: str, path: Path, value: np.ndarray, shape: Tuple[int, ...]):
    if tuple(value.shape) != tuple(shape):
      raise ValueError(
          f'{self.source}: key {key!r} converts to shape {tuple(value.shape)} but '
          f'our parameter {"/".join(path)} has shape {tuple(shape)}'
      )
    return value

  def leftover(self, unused_patterns: Iterable[str]):
    patterns = [re.compile(p) for p in unused_patterns]
    left = sorted(
        k
        for k in self.state_dict
        if k not in self.used and not any(p.fullmatch(k) for p in patterns)
    )
    if left:
      shown = ', '.join(left[:12]) + (f' ... ({len(left)} in all)' if len(left) > 12 else '')
      raise ValueError(
          f'{self.source}: checkpoint keys with no counterpart in our encoder '
          f'(not implemented, refusing to ignore them): {shown}'
      )


def _vit_leaf(path: Path) -> Tuple[str, Callable]:
  """The timm key and transform of one ViT leaf (vit.py lists the mapping)."""
  *modules, leaf = path
  if modules == ['patch_embed']:
    return f'patch_embed.proj.{"weight" if leaf == "kernel" else "bias"}', (
        _conv if leaf == 'kernel' else _identity
    )
  if not modules:  # cls_token, dist_token, pos_embed (resampled separately)
    return leaf, _identity
  prefix = list(modules)
  match = re.fullmatch(r'block(\d+)', prefix[0])
  if match:
    prefix[0] = f'blocks.{match.group(1)}'
  if leaf == 'kernel':
    return '.'.join(prefix + ['weight']), _dense
  if leaf == 'scale':  # LayerNorm
    return '.'.join(prefix + ['weight']), _identity
  return '.'.join(prefix + [leaf]), _identity


def _convert_vit(converter: _Converter, shapes, model_config) -> Params:
  flat = {}
  num_prefix = 2 if model_config.distilled else 1
  for path, shape in shapes.items():
    if _is_depth_branch(path):
      continue
    key, transform = _vit_leaf(path)
    value = transform(converter.take(key, path))
    if path == ('pos_embed',):
      value = _resample_pos_embed(converter.source, value, shape, num_prefix)
    flat[path] = converter.check(key, path, value, shape)
  converter.leftover(_VIT_UNUSED)
  return flat


def _resample_pos_embed(
    source: str, pos_embed: np.ndarray, shape: Tuple[int, ...], num_prefix: int
) -> np.ndarray:
  """Resamples a checkpoint's [1, prefix + g*g, D] table to the grid of `shape`."""

  def grid_side(num_tokens, what):
    side = math.isqrt(max(num_tokens - num_prefix, 0))
    if side * side != num_tokens - num_prefix:
      raise ValueError(
          f"{source}: key 'pos_embed' ({what}) has {num_tokens} tokens: not "
          f'{num_prefix} prefix token(s) + a square grid (distilled setting?)'
      )
    return side

  if pos_embed.ndim != 3 or pos_embed.shape[-1] != shape[-1]:
    return pos_embed  # the shape check names the key
  old, new = grid_side(pos_embed.shape[1], 'checkpoint'), grid_side(shape[1], 'model')
  if old == new:
    return pos_embed
  logging.info('%s: resampling pos_embed from a %dx%d to a %dx%d grid', source, old, old, new, new)
  resampled = vit.resample_pos_embed(jnp.asarray(pos_embed), (old, old), (new, new), num_prefix)
  return np.asarray(resampled, np.float32)


def _hrnet_prefixes(modules: Path) -> Tuple[str, str]:
  """timm (conv, batchnorm) key prefixes of one of our ConvNorm modules (hrnet.py names)."""
  top, rest = modules[0], list(modules[1:])
  if top in ('conv1', 'conv2') and not rest:
    return top, f'bn{top[-1]}'

  def block_layer(base, name):
    # Inside a residual block: convK + bnK, or downsample.0 + downsample.1.
    if name == 'downsample':
      return f'{base}.downsample.0', f'{base}.downsample.1'
    return f'{base}.{name}', f'{base}.bn{name[len("conv"):]}'

  match = re.fullmatch(r'layer1_block(\d+)', top)
  if match and len(rest) == 1:
    return block_layer(f'layer1.{match.group(1)}', rest[0])
  match = re.fullmatch(r'transition(\d+)_(\d+)', top)
  if match and not rest:
    k, b = int(match.group(1)), int(match.group(2))
    # Transition k follows a stage with k branches: b < k adapts an existing branch
    # (Sequential(conv, bn, relu)); b == k is the new branch (Sequential(Sequential(...))).
    base = f'transition{k}.{b}' if b < k else f'transition{k}.{b}.0'
    return f'{base}.0', f'{base}.1'
  match = re.fullmatch(r'stage(\d+)_module(\d+)', top)
  if match and rest:
    base = f'stage{match.group(1)}.{match.group(2)}'
    sub = re.fullmatch(r'branch(\d+)_block(\d+)', rest[0])
    if sub and len(rest) == 2:
      return block_layer(f'{base}.branches.{sub.group(1)}.{sub.group(2)}', rest[1])
    sub = re.fullmatch(r'fuse(\d+)_(\d+)(?:_(\d+))?', rest[0])
    if sub and len(rest) == 1:
      fuse = f'{base}.fuse_layers.{sub.group(1)}.{sub.group(2)}'
      if sub.group(3) is not None:
        fuse = f'{fuse}.{sub.group(3)}'
      return f'{fuse}.0', f'{fuse}.1'
  raise ValueError(
      f'HRNet import: our module {"/".join(modules)} has no timm counterpart ' '(not implemented)'
  )


def _convert_hrnet(converter: _Converter, shapes, model_config) -> Params:
  if model_config.get('hrnet_norm', 'group') != 'frozen_bn':
    raise ValueError(
        'timm HRNet checkpoints carry BatchNorm layers, which only the frozen-BatchNorm form '
        'of our HRNet can hold: set config.model.hrnet_norm="frozen_bn" (the GroupNorm form, '
        'the default for training from scratch, cannot take them)'
    )
  flat = {}
  for path, shape in shapes.items():
    if _is_depth_branch(path):
      continue
    *modules, norm_or_conv, leaf = path
    conv_prefix, bn_prefix = _hrnet_prefixes(tuple(modules))
    if norm_or_conv == 'conv' and leaf == 'kernel':
      key = f'{conv_prefix}.weight'
      value = _conv(converter.take(key, path))
    elif norm_or_conv == 'bn' and leaf in ('scale', 'bias'):
      key = f'{bn_prefix}.{"weight" if leaf == "scale" else "bias"}'
      gamma = converter.take(f'{bn_prefix}.weight', path)
      beta = converter.take(f'{bn_prefix}.bias', path)
      mean = converter.take(f'{bn_prefix}.running_mean', path)
      var = converter.take(f'{bn_prefix}.running_var', path)
      scale = gamma / np.sqrt(var.astype(np.float64) + BATCH_NORM_EPS)
      value = scale if leaf == 'scale' else beta - mean * scale
      value = value.astype(gamma.dtype)
    else:
      raise ValueError(
          f'HRNet import: parameter {"/".join(path)} has no timm counterpart ' '(not implemented)'
      )
    flat[path] = converter.check(key, path, value, shape)
  # timm's last stage-4 module also fuses into the three coarser branches (for its
  # classification head); our encoder keeps only the high-resolution output.
  num_modules = hrnet.HRNET_SIZES[model_config.encoder_size].num_modules[-1]
  last = rf'stage4\.{num_modules - 1}\.fuse_layers\.[123]\..*'
  converter.leftover(_HRNET_UNUSED + (last,))
  return flat


def convert_state_dict(state_dict: StateDict, model_config, source: str = 'checkpoint') -> Params:
  """Converts a timm state dict to the params of `build_encoder(model_config)`.

  Args:
    state_dict: {timm key: array} (see `read_state_dict`).
    model_config: config.model (encoder, encoder_size, patch_size, distilled,
      pretrained_image_size, use_depth, hrnet_norm).
    source: a name for error messages (the file).
  Returns:
    Nested dict of float32 numpy arrays: every encoder leaf except the depth branch.
  """
  shapes = expected_shapes(model_config)
  converter = _Converter(state_dict, source)
  if model_config.encoder == 'hrnet':
    flat = _convert_hrnet(converter, shapes, model_config)
  else:
    flat = _convert_vit(converter, shapes, model_config)
  return flax.traverse_util.unflatten_dict(flat)


def load_timm_checkpoint(path: str, model_config) -> Params:
  """Reads a timm-format checkpoint and returns params for our encoder (see the module doc).

  Args:
    path: `.safetensors`, `.pth` / `.pt` / `.bin`, or a `.msgpack` written by `convert`.
    model_config: config.model.
  Returns:
    The encoder's params (nested dict of float32 numpy arrays), without the depth branch.
  """
  if pathlib.Path(path).suffix == '.msgpack':
    return _read_msgpack(path, model_config)
  return convert_state_dict(read_state_dict(path), model_config, source=os.fspath(path))


def _read_msgpack(path, model_config) -> Params:
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'pretrained checkpoint not found: {path}')
  try:
    params = flax.serialization.msgpack_restore(path.read_bytes())
    if not isinstance(params, dict):
      raise TypeError(f'expected a dict of parameters, got {type(params).__name__}')
    flat = flax.traverse_util.flatten_dict(params)
  except Exception as e:  # a corrupt or truncated file: msgpack's errors, bad array records
    raise ValueError(f'{path}: not a readable .msgpack file ({type(e).__name__}: {e})') from e
  shapes = {p: s for p, s in expected_shapes(model_config).items() if not _is_depth_branch(p)}
  for p, shape in shapes.items():
    if p not in flat:
      raise KeyError(
          f'{path}: parameter {"/".join(p)} is missing (converted for another ' 'config.model?)'
      )
    if tuple(np.shape(flat[p])) != shape:
      raise ValueError(
          f'{path}: parameter {"/".join(p)} has shape {np.shape(flat[p])}, the '
          f'model wants {shape}'
      )
  extra = sorted('/'.join(p) for p in flat if p not in shapes)
  if extra:
    raise ValueError(f'{path}: parameters with no place in the encoder: {", ".join(extra[:12])}')
  return flax.traverse_util.unflatten_dict({p: np.asarray(v, np.float32) for p, v in flat.items()})


def save_msgpack(params: Params, path: str):
  """Writes encoder params (nested dict of arrays) as a flax msgpack file."""
  data = flax.serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, params))
  pathlib.Path(path).write_bytes(data)


def load_pretrained_encoder(params: Params, config) -> Params:
  """`params` (the whole DiffHand tree) with the encoder taken from config.model.pretrained_path.

  No-op when pretrained_path is empty. Every encoder leaf is replaced except the depth
  branch, which keeps its (zero) init; dtypes follow `params`.
  """
  path = config.model.get('pretrained_path', '')
  if not path:
    if config.model.encoder == 'hrnet' and config.model.get('hrnet_norm') == 'frozen_bn':
      logging.warning(
          'model.hrnet_norm="frozen_bn" without model.pretrained_path: every norm '
          'starts as the identity (no normalisation); use "group" from scratch'
      )
    return params
  loaded = flax.traverse_util.flatten_dict(load_timm_checkpoint(path, config.model))
  params = flax.core.unfreeze(params)
  if 'encoder' not in params:
    raise ValueError('model params have no "encoder" subtree to load the pretrained weights into')
  flat = flax.traverse_util.flatten_dict(params['encoder'])
  for p, value in flat.items():
    if p in loaded:
      if tuple(np.shape(loaded[p])) != tuple(value.shape):
        raise ValueError(
            f'{path}: parameter {"/".join(p)} has shape {np.shape(loaded[p])}, '
            f'the model wants {value.shape}'
        )
      flat[p] = jnp.asarray(loaded[p], dtype=value.dtype)
    elif not _is_depth_branch(p):
      raise KeyError(f'{path}: no value for encoder parameter {"/".join(p)}')
  params['encoder'] = flax.traverse_util.unflatten_dict(flat)
  logging.info('loaded %d pretrained encoder arrays from %s', len(loaded), path)
  return params


# ---- CLI ----
def main(argv):
  """`convert IN OUT.msgpack --config=...`: the encoder params of config.model as msgpack."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  if len(argv) != 4 or argv[1] != 'convert':
    raise SystemExit(
        'usage: python -m diffhand_jax.weights convert IN.(safetensors|pth|bin) '
        'OUT.msgpack --config=configs/<setting>.py [--config.model.<key>=...]'
    )
  model_config = flags.FLAGS.config.model
  params = load_timm_checkpoint(argv[2], model_config)
  save_msgpack(params, argv[3])
  count = sum(np.size(x) for x in jax.tree_util.tree_leaves(params))
  print(
      f'wrote {argv[3]}: {count:,} encoder parameters for model.encoder='
      f'{model_config.encoder!r} size={model_config.encoder_size!r}'
  )


if __name__ == '__main__':
  # Defined here, not at import: launch.py defines its own --config.
  from absl import app  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file('config', None, 'experiment config file', lock_config=True)
  app.run(main)
