"""sequencer-jax: Sequencer (deep LSTMs for image classification) in JAX/Flax."""

from sequencer_jax import convert, xla_options
from sequencer_jax.models import (BiRNN1D, BiRNN2D, Sequencer, Sequencer1D, Sequencer2D,
                                  SequencerBlock, create_model, list_models)

__version__ = '0.1.0'

__all__ = ['BiRNN1D', 'BiRNN2D', 'Sequencer', 'Sequencer1D', 'Sequencer2D', 'SequencerBlock',
           'convert', 'create_model', 'list_models', 'xla_options']
