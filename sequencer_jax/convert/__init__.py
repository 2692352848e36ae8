"""PyTorch Sequencer weights (timm's or the official repository's) in sequencer-jax::

    variables = sequencer_jax.convert.from_torch_state_dict(state_dict, 'sequencer2d_s')
    state_dict = sequencer_jax.convert.to_timm_state_dict(variables['params'])
    sequencer_jax.convert.save_converted(directory, 'sequencer2d_s', 1000, variables)
    model, variables = sequencer_jax.convert.load_converted(directory)

The command line is this package's ``__main__`` (``python -m sequencer_jax.convert``);
importing the package defines no flags, so it fits into programs with flags of their own.
"""

from sequencer_jax.models.torch_weights import (from_torch_state_dict, official_to_timm_keys,
                                                to_timm_state_dict)
from sequencer_jax.weights import load_converted, load_state_dict_file, save_converted

__all__ = ['from_torch_state_dict', 'load_converted', 'load_state_dict_file',
           'official_to_timm_keys', 'save_converted', 'to_timm_state_dict']
