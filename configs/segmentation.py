"""Semantic segmentation: a Sequencer2D backbone with UperNet (and an auxiliary FCN head).

Default: the embedded ``digit_canvases`` (three handwritten digits per 64x64 canvas, 11
classes: background and the digits), a narrow backbone, a few minutes on a 2-core CPU.
``dataset=ade20k``: mmsegmentation's 160k-iteration UperNet recipe for ADE20K (TFDS
``scene_parse150``, 150 classes, label 0 ignored): AdamW lr 6e-5 at batch 16, weight
decay 0.01 (not on norms and biases), poly schedule (power 1) after 1,500 linear warmup
iterations, 512x512 crops of images rescaled 0.5-2x of 2048x512, evaluation of images
rescaled to 2048x512 by 512 windows every 341 pixels. Start from ImageNet weights:
``--config.init_from=hf-hub:timm/sequencer2d_s.in1k`` (or a workdir, or a converted
directory).

Variant string (comma-separated): ``dataset=digits|ade20k``, ``model=NAME`` (any
registered variant; the full-size widths with ade20k), ``mesh=data|fsdp|DxF``,
``dtype=float32|bfloat16``, ``remat=true|false``, ``recurrence=natural|scan|pallas``.
Example: ``--config=configs/segmentation.py:dataset=ade20k,model=sequencer2d_m,dtype=bfloat16``.
"""

from sequencer_jax import config_defaults
from sequencer_jax.errors import UserError

# The warmup starts at this fraction of base_lr (mmsegmentation's LinearLR start_factor).
WARMUP_START = 1e-6


def _digits(config):
    config.model.args.update(layers=(1, 1, 2, 1), patch_sizes=(4, 2, 1, 1),
                             embed_dims=(32, 64, 64, 64), hidden_sizes=(8, 16, 16, 16),
                             drop_path_rate=0.0)
    config.model.num_classes = 11
    config.dataset = config_defaults.dataset_config('digit_canvases', shuffle_buffer=1000,
                                                    label_key='segmentation_mask')
    config.segmentation = config_defaults.segmentation_config(
        scale=(64, 64), ratio_range=(0.75, 1.5), cat_max_ratio=1.0, flip=False,
        channels=64, aux_channels=32)
    config.image_size = 64
    config.batch_size = 16
    config.num_train_steps = 1000
    config.optimizer.base_lr = 2e-3
    config.optimizer.warmup_lr = 2e-3 * WARMUP_START
    config.optimizer.weight_decay = 0.01
    config.optimizer.warmup_steps = 50
    config.log_every_steps = 50
    config.eval_every_steps = 500
    config.checkpoint_every_steps = 500


def _ade20k(config):
    config.model.args.drop_path_rate = 0.1
    config.model.args.scan_blocks = True
    config.model.num_classes = 150
    config.dataset = config_defaults.dataset_config('scene_parse150', label_key='annotation',
                                                    shuffle_buffer=2048)
    config.segmentation = config_defaults.segmentation_config(
        reduce_zero_label=True, eval_scale=(2048, 512), eval_canvas=(2048, 2048),
        eval_label_canvas=(2048, 2048), inference='slide')
    config.image_size = 512
    config.batch_size = 16
    config.eval_batch_size = 8
    config.num_train_steps = 160_000
    config.optimizer.base_lr = 6e-5
    config.optimizer.warmup_lr = 6e-5 * WARMUP_START
    config.optimizer.weight_decay = 0.01
    config.optimizer.warmup_steps = 1500
    config.log_every_steps = 50
    config.eval_every_steps = 16_000
    config.checkpoint_every_steps = 2000


DATASETS = {'digits': _digits, 'ade20k': _ade20k}


def _set_dataset(config, name):
    if name not in DATASETS:
        raise UserError(f'Unknown dataset {name!r}: use one of {sorted(DATASETS)}.')
    DATASETS[name](config)


def get_config(arg=None):
    config = config_defaults.base_config()
    config.task = 'segmentation'
    config.optimizer.update(schedule='poly', power=1.0, reference_batch_size=16, min_lr=0.0)
    config.best_metric = 'eval/miou'
    if 'dataset=' not in (arg or ''):
        _digits(config)
    return config_defaults.apply_variant(config, arg, {
        'dataset': _set_dataset, 'model': config_defaults.set_model,
        'mesh': config_defaults.set_mesh,
        'dtype': config_defaults.set_dtype, 'remat': config_defaults.set_remat,
        'recurrence': config_defaults.set_recurrence})
