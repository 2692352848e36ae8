"""Fine-tuning Sequencer from a converted PyTorch or trained checkpoint.

Set the starting weights with ``--config.init_from=DIR`` (a directory written by
``python -m sequencer_jax.convert``, or a training workdir); training refuses to start
without it. The transfer tasks re-initialise the classifier head for their classes;
``imagenet392`` keeps the trained 1,000-class head.

Variant string: ``task=`` one of
  ``cifar10``, ``cifar100``, ``oxford_flowers102``, ``cars196`` (the official transfer
  recipe: AdamW lr 1e-4 at batch 512, weight decay 1e-4, 200 epochs cosine, 5 warmup
  epochs, gradient clipping 1, drop path 0.1, 224 px, RandAugment, mixup/cutmix, label
  smoothing 0.1), or
  ``imagenet392`` (the 392 px fine-tune: 30 epochs, lr 5e-5 at batch 512, weight decay
  1e-8, crop_pct 1.0, drop path 0.4, no warmup);
plus ``model=NAME``, ``mesh=data|fsdp|DxF``, ``dtype=float32|bfloat16``.
Example: ``--config=configs/finetune.py:task=cifar10,model=sequencer2d_s``.
"""

from sequencer_jax import config_defaults
from sequencer_jax.errors import UserError

# task -> (TFDS name, train split, eval split)
TRANSFER = {
    'cifar10': ('cifar10', 'train', 'test'),
    'cifar100': ('cifar100', 'train', 'test'),
    'oxford_flowers102': ('oxford_flowers102', 'train+validation', 'test'),
    'cars196': ('cars196', 'train', 'test'),
}


def _transfer(config, task):
    name, train_split, eval_split = TRANSFER[task]
    config.dataset = config_defaults.dataset_config(name, train_split=train_split,
                                                    eval_split=eval_split)
    config.reinit_head = True  # new classes
    config.augment = config_defaults.augment_config(erase_prob=0.0)
    config.image_size = 224
    config.batch_size = 512
    config.num_epochs = 200
    config.model.args.drop_path_rate = 0.1
    opt = config.optimizer
    opt.base_lr, opt.reference_batch_size = 1e-4, 512
    opt.weight_decay, opt.grad_clip_norm = 1e-4, 1.0
    opt.warmup_epochs, opt.warmup_lr, opt.min_lr = 5, 1e-6, 1e-6


def _imagenet392(config):
    config.dataset = config_defaults.dataset_config('imagenet2012')
    config.reinit_head = False  # the same 1,000 classes: the trained head carries over
    config.augment = config_defaults.augment_config()
    config.image_size = 392
    config.crop_pct = 1.0
    config.batch_size = 512
    config.num_epochs = 30
    config.model.args.drop_path_rate = 0.4
    opt = config.optimizer
    opt.base_lr, opt.reference_batch_size = 5e-5, 512
    opt.weight_decay, opt.warmup_epochs = 1e-8, 0


def _set_task(config, task):
    if task == 'imagenet392':
        _imagenet392(config)
    elif task in TRANSFER:
        _transfer(config, task)
    else:
        raise UserError(f'Unknown fine-tuning task {task!r}; expected one of '
                         f'{sorted(TRANSFER) + ["imagenet392"]}.')


def get_config(arg=None):
    config = config_defaults.base_config()
    config.model.args.scan_blocks = True
    config.requires_init_from = True
    config.log_every_steps = 50
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 1000
    _set_task(config, 'cifar10')
    return config_defaults.apply_variant(config, arg, {
        'task': _set_task, 'model': config_defaults.set_model,
        'mesh': config_defaults.set_mesh, 'dtype': config_defaults.set_dtype,
        'remat': config_defaults.set_remat, 'recurrence': config_defaults.set_recurrence})
