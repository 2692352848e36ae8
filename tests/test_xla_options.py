"""Compiler options: chosen per backend, overridable by XLA_FLAGS, same numbers."""

import jax
import jax.numpy as jnp
import numpy as np

import sequencer_jax as sj
from sequencer_jax import xla_options
from sequencer_jax.train import mesh as mesh_lib

# Start JAX with conftest's 8 CPU devices before a test below clears XLA_FLAGS.
DEVICES = jax.devices()


def test_options_only_on_cpu_and_user_flags_win(monkeypatch):
    monkeypatch.delenv('XLA_FLAGS', raising=False)
    assert xla_options.compiler_options('cpu') == xla_options.CPU_OPTIONS
    assert xla_options.compiler_options('gpu') is None
    assert xla_options.compiler_options('tpu') is None
    monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=')
    assert xla_options.compiler_options('cpu') is None


def test_unknown_options_are_dropped():
    assert not xla_options._supported('cpu', (('xla_cpu_no_such_option', 'x'),))
    assert xla_options._supported('cpu', tuple(xla_options.CPU_OPTIONS.items()))


def test_options_are_found_under_a_multi_device_mesh(monkeypatch):
    """The trainer asks for them under its mesh (jax.set_mesh over 8 devices here); the
    probe must still accept them (it once failed there, and the answer was cached)."""
    monkeypatch.delenv('XLA_FLAGS', raising=False)
    xla_options._supported.cache_clear()
    with jax.set_mesh(mesh_lib.make_mesh([('data', 4), ('fsdp', 2)], DEVICES)):
        assert xla_options.compiler_options('cpu') == xla_options.CPU_OPTIONS


def test_model_gives_the_same_numbers_with_the_options():
    model = sj.create_model('sequencer2d_s', num_classes=5, layers=(1, 1, 1, 1),
                            embed_dims=(16, 24, 24, 24), hidden_sizes=(4, 6, 6, 6))
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 56, 56, 3))
    variables = model.init(jax.random.PRNGKey(1), images)
    loss = lambda v: jnp.sum(model.apply(v, images) ** 2)  # noqa: E731
    plain = jax.jit(jax.value_and_grad(loss))(variables)
    tuned = jax.jit(jax.value_and_grad(loss),
                    compiler_options=xla_options.compiler_options())(variables)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 plain, tuned)
