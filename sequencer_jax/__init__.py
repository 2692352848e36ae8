"""sequencer-jax: Sequencer (deep LSTMs for image classification) in JAX/Flax."""

import importlib

from sequencer_jax import xla_options
from sequencer_jax.models import (BiRNN1D, BiRNN2D, Sequencer, Sequencer1D, Sequencer2D,
                                  SequencerBlock, SequencerUperNet, create_model, list_models)

__version__ = '0.1.0'

__all__ = ['BiRNN1D', 'BiRNN2D', 'Sequencer', 'Sequencer1D', 'Sequencer2D', 'SequencerBlock',
           'SequencerUperNet', 'convert', 'create_model', 'list_models', 'load',
           'load_pretrained', 'preprocess', 'xla_options']


def __getattr__(name: str):
    # Imported on first use, not with the package: weights I/O brings orbax and the Hub
    # client, which a user of the modules alone does not need.
    if name == 'convert':
        return importlib.import_module('sequencer_jax.convert')
    if name in ('load', 'load_pretrained'):
        return getattr(importlib.import_module('sequencer_jax.weights'), name)
    if name == 'preprocess':  # PIL, on first use
        return importlib.import_module('sequencer_jax.images').preprocess
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
