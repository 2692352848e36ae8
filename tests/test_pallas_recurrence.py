"""The fused Pallas recurrence: parity with the nn.scan path (kernels interpreted on CPU),
several program blocks, bfloat16, whole models, and lowering to Triton for a GPU.

Every cell type and direction option is also checked against the scan path in
test_models.py (test_fast_recurrence_*)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import sequencer_jax as sj
from sequencer_jax.models import pallas_recurrence, recurrent

TRITON_CALL = '__gpu$xla.gpu.triton'


def _outputs_and_grads(models, variables, x):
    loss = lambda m: lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)))  # noqa: E731
    return [(m.apply(variables, x), jax.grad(loss(m), argnums=(0, 1))(variables, x))
            for m in models]


def _assert_close(actual, expected, atol, rtol=1e-7):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol, rtol=rtol),
                 actual, expected)


@pytest.mark.parametrize('dtype, tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_several_blocks_of_sequences_and_unpadded_hidden_size(dtype, tol):
    """Hidden 16 needs no padding; 4 x 12 = 48 vertical sequences make two programs of
    32 per recurrence, the second one partly padding; the horizontal pass has 12."""
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 12, 8))
    fused, reference = (sj.BiRNN2D(16, recurrence=r, dtype=dtype) for r in ('pallas', 'scan'))
    variables = reference.init(jax.random.PRNGKey(1), x)
    (y, grads), (y_ref, grads_ref) = jax.jit(_outputs_and_grads, static_argnums=0)(
        (fused, reference), variables, x)
    # bfloat16: one rounding step of the largest outputs (|y| ~ 5) is 0.03.
    rtol = tol if dtype == jnp.bfloat16 else 1e-7
    _assert_close(y.astype(jnp.float32), y_ref.astype(jnp.float32), tol, rtol)
    _assert_close(grads, grads_ref, tol, rtol)


def test_whole_model_with_scan_blocks_and_remat_equals_the_default_path():
    tiny = dict(layers=(1, 1, 2, 1), embed_dims=(16, 24, 24, 24), hidden_sizes=(4, 6, 6, 6))
    fused, reference = (sj.create_model('sequencer2d_s', num_classes=3, recurrence=r,
                                        scan_blocks=True, remat=True, **tiny)
                        for r in ('pallas', 'natural'))
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 28, 28, 3))
    variables = reference.init(jax.random.PRNGKey(1), images, train=False)

    @jax.jit
    def logits_and_grads(variables):
        loss = lambda m: lambda v: jnp.sum(m.apply(v, images, train=False) ** 2)  # noqa: E731
        return [(m.apply(variables, images, train=False), jax.grad(loss(m))(variables))
                for m in (fused, reference)]

    (y, grads), (y_ref, grads_ref) = logits_and_grads(variables)
    _assert_close(y, y_ref, 1e-5)
    _assert_close(grads, grads_ref, 1e-4)


@pytest.mark.parametrize('cell', recurrent.CELL_TYPES)
def test_forward_and_backward_lower_to_triton_kernels_for_a_gpu(cell):
    """Lowering for CUDA from this CPU host runs Pallas' Triton lowering of both kernels:
    every primitive they use must be supported there, with power-of-two block sides
    (hidden 6 and 6 x 5 sequences are padded)."""
    model = sj.BiRNN2D(6, cell=cell, recurrence='pallas')
    x = jnp.ones((6, 5, 5, 8))
    variables = model.init(jax.random.PRNGKey(0), x)
    grad = jax.jit(jax.grad(lambda v, x: jnp.sum(model.apply(v, x)), argnums=(0, 1)))
    exported = export.export(
        grad, platforms=['cuda'],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(variables, x)
    assert exported.mlir_module().count(f'@{TRITON_CALL}') == 2  # forward and backward


def test_clear_errors(monkeypatch):
    gx = jnp.zeros((3, 2, 4, 4 * 8))
    weights = recurrent.RecurrentWeights(8).init_with_output(jax.random.PRNGKey(0), 5)[0]
    cell = recurrent.get_cell('lstm')
    with pytest.raises(ValueError, match='power of two >= 16'):
        pallas_recurrence.run_recurrence_pallas(gx, weights, cell, (False, True), block=24)
    with pytest.raises(ValueError, match='reverse has 1 entries for 2 recurrences'):
        pallas_recurrence.run_recurrence_pallas(gx, weights, cell, (False,))
    monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
    with pytest.raises(ValueError, match="Use recurrence='natural' there"):
        pallas_recurrence.run_recurrence_pallas(gx, weights, cell, (False, True))
    with pytest.raises(ValueError, match="Unknown recurrence 'cudnn'"):
        sj.BiRNN2D(8, recurrence='cudnn')
