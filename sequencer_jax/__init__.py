"""sequencer-jax: Sequencer (deep LSTMs for image classification) in JAX/Flax."""

import importlib

from sequencer_jax import xla_options
from sequencer_jax.models import (BiRNN1D, BiRNN2D, Sequencer, Sequencer1D, Sequencer2D,
                                  SequencerBlock, create_model, list_models)

__version__ = '0.1.0'

__all__ = ['BiRNN1D', 'BiRNN2D', 'Sequencer', 'Sequencer1D', 'Sequencer2D', 'SequencerBlock',
           'convert', 'create_model', 'list_models', 'xla_options']


def __getattr__(name: str):
    # ``sj.convert`` is imported on first use, not with the package: importing it here
    # made ``python -m sequencer_jax.convert`` warn that runpy found the module already
    # imported (its CLI would then run a second copy of it).
    if name == 'convert':
        return importlib.import_module('sequencer_jax.convert')
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
