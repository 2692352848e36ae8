"""Flax modules of Sequencer and the variant registry."""

from sequencer_jax.models.pallas_recurrence import run_recurrence_pallas
from sequencer_jax.models.recurrent import RecurrentWeights, run_recurrence
from sequencer_jax.models.registry import create_model, list_models, model_args
from sequencer_jax.models.segmentation import SequencerUperNet, predict_logits
from sequencer_jax.models.sequencer import (BiRNN1D, BiRNN2D, Sequencer, Sequencer1D,
                                            Sequencer2D, SequencerBlock)

__all__ = ['BiRNN1D', 'BiRNN2D', 'RecurrentWeights', 'Sequencer', 'Sequencer1D',
           'Sequencer2D', 'SequencerBlock', 'SequencerUperNet', 'create_model', 'list_models',
           'model_args', 'predict_logits', 'run_recurrence', 'run_recurrence_pallas']
