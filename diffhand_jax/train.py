"""Training DiffHand: the task (model, losses, data, periodic evaluation) on the generic loop.

`train_loop.run_training` holds the loop (data parallelism, checkpoints, resume, preemption,
NaN guard); this module builds the DiffHand `Task` for it and is what `--mode=train` calls.
"""

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from configs import common
from diffhand_jax import checkpointing
from diffhand_jax import evaluate as evaluate_lib
from diffhand_jax import input_pipeline
from diffhand_jax import logging_utils
from diffhand_jax import models
from diffhand_jax.models import encoder as encoder_lib
from diffhand_jax import procedural_mano
from diffhand_jax import train_step as train_step_lib
from diffhand_jax import weights

from diffhand_jax.train_loop import Task
from diffhand_jax.train_loop import run_training

# The progress line's numbers after loss and lr: the error at t = T - 1 (pure noise, only the
# image tells the hand: whether the image is used) and the gradient norm.
WATCH = ('loss_x0_tmax', 'grad_norm')


# ---- The DiffHand task ----
def build_task(config: ml_collections.ConfigDict, workdir: str) -> Task:
  """The DiffHand model, losses, train stream and periodic evaluation."""
  # ---- Model ----
  model = models.build_model(config)
  faces = procedural_mano.load_hand_model(config).faces
  size = int(config.data.image_size)
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  depth = jnp.zeros((1, size, size, 1), jnp.float32) if config.model.use_depth else None

  def init(rng):
    # config.model.pretrained_path (a timm checkpoint or its converted .msgpack) replaces
    # the encoder's initial values; '' keeps them. init_from, if set, is applied after this.
    return weights.load_pretrained_encoder(models.init_params(model, rng, images, depth), config)

  # ---- Evaluation ----
  eval_writer = logging_utils.MetricWriter(workdir, 'eval')
  sample_fn = evaluate_lib.make_sample_fn(model, config)  # compiled once
  diagnostics_fn = evaluate_lib.make_diagnostics_fn(model)

  def evaluate(params, step):
    return evaluate_lib.evaluate(
        config,
        params,
        model=model,
        workdir=workdir,
        step=step,
        writer=eval_writer,
        sample_fn=sample_fn,
        diagnostics_fn=diagnostics_fn,
    )

  return Task(
      init_params=init,
      loss_fn=train_step_lib.make_loss_fn(model, config, faces),
      train_iterator=lambda start: iter(
          input_pipeline.create_train_iterator(config, start_step=start)
      ),
      evaluate=evaluate,
      cacheable=True,
      init_from_adapter=encoder_lib.init_from_adapter(config.model),
      watch=WATCH,
  )


def resolve_epochs(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """With config.train.num_epochs > 0: a copy whose num_steps (and warm-up, checkpoint and eval
  intervals) are set for that many epochs of the prepared training split, counted from it
  (`configs/common.epoch_schedule`); else `config` itself."""
  if float(config.train.get('num_epochs', 0.0)) <= 0:
    return config
  count = input_pipeline.train_split_size(config)
  resolved = ml_collections.ConfigDict(config.to_dict())
  common.epoch_schedule(resolved, count)
  if jax.process_index() == 0:
    logging.info(
        'Training split of %r: %d examples (counted); %g epochs at batch %d = %d steps.',
        config.data.name,
        count,
        float(config.train.num_epochs),
        int(config.train.global_batch_size),
        resolved.train.num_steps,
    )
  return resolved


def warn_if_from_scratch(config: ml_collections.ConfigDict) -> bool:
  """Warns (and returns True) when a real-data run starts its encoder from random weights.

  The paper's recipe fine-tunes an ImageNet-pretrained encoder; training DeiT-Large or HRNet
  from scratch on FreiHAND / DexYCB / HO-3D is rarely what was meant. Runs that start from
  another run (`init_from`) and the synthetic default (trained from scratch by design) are quiet.
  """
  if config.data.name == 'synthetic' or config.model.pretrained_path or config.init_from:
    return False
  logging.warning(
      'config.model.pretrained_path is empty: the %s-%s encoder starts from random weights, '
      'while the paper fine-tunes ImageNet weights. Pass '
      '--config.model.pretrained_path=/path/to/timm_weights.safetensors (README, "Real data").',
      config.model.encoder,
      config.model.encoder_size,
  )
  return True


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, periodic_eval: bool = True
) -> train_step_lib.TrainState:
  """`--mode=train`: trains DiffHand per `config` in `workdir` (resuming).

  periodic_eval=False skips the evaluations during and at the end of training (the demo
  evaluates on an unseen seed afterwards instead).
  """
  checkpointing.check_writable(workdir)  # before the data set is built
  warn_if_from_scratch(config)
  config = resolve_epochs(config)
  task = build_task(config, workdir)
  if not periodic_eval:
    task = task._replace(evaluate=None)
  return run_training(config, workdir, task)
