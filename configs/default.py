"""The README's main job: a small Sequencer2D on the embedded default dataset, on CPU.

Variant string (comma-separated ``key=value``), e.g. ``configs/default.py:model=sequencer2d_s``.
"""

import ml_collections


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = ml_collections.ConfigDict()
    config.model.name = 'sequencer2d_s'
    # A narrow, shallow Sequencer2D-S so that the job runs in minutes on a laptop CPU.
    config.model.args = ml_collections.ConfigDict(dict(
        layers=(1, 1, 2, 1), embed_dims=(32, 64, 64, 64), hidden_sizes=(8, 16, 16, 16)))
    config.model.num_classes = 10
    config.image_size = 28
    config.batch_size = 32
    for part in (arg or '').split(','):
        if part:
            key, _, value = part.partition('=')
            if key != 'model':
                raise ValueError(f'Unknown variant key {key!r} in {arg!r}; known: model.')
            config.model.name = value
    config.lock()
    return config
