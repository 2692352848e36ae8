"""TFDS builders shipped with sequencer-jax. Importing this package registers them."""

from sequencer_jax.data.builders.digit_canvases import DigitCanvases
from sequencer_jax.data.builders.sklearn_digits import SklearnDigits

__all__ = ['DigitCanvases', 'SklearnDigits']
