"""The config a training run last started with, read from its workdir's ``config.json``.

Variant string: ``dir=`` the workdir, e.g.
``--config=configs/workdir.py:dir=/tmp/sequencer_default``, with overrides as for any
config file (``--config.num_train_steps=1000`` to train a finished run on). The CLIs that
read a checkpoint (``evaluate``, the experiments) and ``main`` resuming a workdir use it by
themselves when ``--config`` is not given.
"""

from sequencer_jax import config_defaults
from sequencer_jax.errors import UserError


def get_config(arg=None):
    key, _, workdir = (arg or '').partition('=')  # not split on ',': a path may hold one
    if key != 'dir' or not workdir:
        raise UserError(f'Bad config variant {arg!r}: configs/workdir.py needs the workdir of '
                         'a training run, --config=configs/workdir.py:dir=DIR.')
    config = config_defaults.saved_config(workdir)
    if config is None:
        raise UserError(f'{workdir} has no {config_defaults.SAVED_CONFIG_FILE} (the config a '
                         'training run saves in its workdir); give the directory of a training '
                         'run, or the config file itself, e.g. --config=configs/imagenet.py.')
    return config
