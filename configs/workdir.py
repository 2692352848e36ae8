"""The config a training run last started with, read from its workdir's ``config.json``.

The argument is the workdir:
``--config=configs/workdir.py:/tmp/sequencer_default``, with overrides as for any config
file (``--config.num_train_steps=1000`` to train a finished run on). The CLIs that read a
checkpoint (``evaluate``, the experiments) and ``main`` resuming a workdir use it by
themselves when ``--config`` is not given.
"""

from sequencer_jax import config_defaults


def get_config(arg=None):
    if not arg:
        raise ValueError('configs/workdir.py needs the workdir of a training run: '
                         '--config=configs/workdir.py:DIR.')
    return config_defaults.saved_config(arg)
