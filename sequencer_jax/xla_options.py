"""XLA compiler options for Sequencer's programs, chosen per backend by measurement.

Pass them to every ``jax.jit`` that runs the model:

    step = jax.jit(train_step, compiler_options=sj.xla_options.compiler_options())

XLA:CPU (jaxlib 0.10) hands dots, elementwise ops and reductions to YNNPACK by
default. For Sequencer's shapes, Eigen's GEMMs are faster than YNNPACK's while
YNNPACK's reductions are much faster than XLA's own loops (LayerNorm's backward), so
on CPU only reductions go to YNNPACK. Measured on 2 cores, sequencer2d_s, batch 8,
224 px, float32, all option sets in one process (on the EPYC, two rounds, with huge
pages):

    YNNPACK for            Xeon (Sapphire Rapids)     AMD EPYC (Zen 5)
                           forward   train step       forward       train step  (img/s)
    default                 10.2      2.96            18.8, 18.9    5.40, 5.56
    nothing                 13.1      3.19            21.4, 20.0    5.79, 5.69
    reductions only         13.0      3.38            20.5, 20.1    5.95, 5.75
    reductions, dots                                  18.4, 16.0    5.77, 5.97
    reductions, elementwise                           17.5, 17.4    4.18, 3.91

Other backends get no options. An option the user sets in ``XLA_FLAGS`` wins, and an
installed jaxlib that does not know an option gets none of them (checked once).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE'}


def compiler_options(backend: str | None = None) -> dict[str, str] | None:
    """The options for ``backend`` (default: JAX's default backend), or None."""
    backend = backend or jax.default_backend()
    if backend != 'cpu':
        return None
    user_flags = os.environ.get('XLA_FLAGS', '')
    options = {k: v for k, v in CPU_OPTIONS.items() if f'--{k}' not in user_flags}
    if not options or not _supported(backend, tuple(sorted(options.items()))):
        return None
    return options


@functools.lru_cache(maxsize=None)
def _supported(backend: str, options: tuple[tuple[str, str], ...]) -> bool:
    """Whether this jaxlib's ``backend`` compiler accepts ``options`` (they are
    experimental and change between releases). The probe runs under its own one-device
    mesh: under a caller's multi-device ``jax.set_mesh`` its one-device operand would be
    rejected, and that answer cached."""
    device = jax.devices(backend)[0]
    try:
        with jax.set_mesh(Mesh(np.array([device]), ('probe',))):
            operand = jax.device_put(jnp.zeros((), jnp.float32), device)
            jax.jit(jnp.negative, compiler_options=dict(options)).lower(operand).compile()
    except Exception:  # noqa: BLE001 - any rejection means: do not use them.
        return False
    return True
