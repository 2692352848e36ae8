"""argparse types shared by the argparse CLIs (benchmark, convert, data.benchmark,
linear_probe): a bad number is a usage error naming the flag, not a traceback later."""

from __future__ import annotations

import argparse
import math
from typing import Callable


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f'must be at least {minimum}, got {value}')
        return value
    return parse


def positive_float(text: str) -> float:
    """An argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f'must be a positive number, got {text}')
    return value
