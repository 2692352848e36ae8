"""Sequencer2D from scratch on ImageNet-1K: the paper's recipe (DeiT-style).

AdamW, lr 2e-3 at global batch 2048 (scaled linearly to config.batch_size), weight decay
0.05 (not on norms/biases), 300 epochs cosine with 20 warmup epochs from 1e-6 to a 1e-6
floor, label smoothing 0.1, mixup 0.8 / cutmix 1.0, RandAugment m9-mstd0.5, random
erasing 0.25, stochastic depth rising linearly to 0.1 / 0.2 / 0.4 for S / M / L.

Variant string (comma-separated): ``model=sequencer2d_s|sequencer2d_m|sequencer2d_l``
(or any registered name), ``mesh=data|fsdp|DxF``, ``dtype=float32|bfloat16``,
``remat=true|false`` (recompute blocks in the backward: needed on 16 GB devices at batch
64 per device), ``recurrence=natural|scan|pallas``, ``dataset=synthetic`` (the same
train step on random images made on the devices: no TensorFlow, no ImageNet; see
``config.dataset.synthetic``).
Example: ``--config=configs/imagenet.py:model=sequencer2d_l,mesh=fsdp,dtype=bfloat16,remat=true``.
ImageNet tars go in ``<data_dir>/downloads/manual/`` (see README).
"""

from sequencer_jax import config_defaults

DROP_PATH = {'sequencer2d_s': 0.1, 'sequencer2d_m': 0.2, 'sequencer2d_l': 0.4}


def _set_model(config, name):
    config_defaults.set_model(config, name)
    config.model.args.drop_path_rate = DROP_PATH.get(name, 0.1)


def get_config(arg=None):
    config = config_defaults.base_config()
    config.model.args.scan_blocks = True  # fast compiles for the deep variants
    config.batch_size = 2048
    config.eval_batch_size = 1000
    config.log_every_steps = 100
    config.eval_every_steps = 6255  # 10 epochs at batch 2048
    config.checkpoint_every_steps = 1000
    return config_defaults.apply_variant(config, arg, {
        'model': _set_model, 'mesh': config_defaults.set_mesh,
        'dtype': config_defaults.set_dtype, 'remat': config_defaults.set_remat,
        'recurrence': config_defaults.set_recurrence, 'dataset': config_defaults.set_dataset})
