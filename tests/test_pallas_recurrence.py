"""The fused Pallas recurrence: parity with the nn.scan path (kernels interpreted on CPU),
several program blocks, bfloat16, whole models, lowering to Triton for a GPU, and (where
libtpu is installed) compiling with Mosaic for a TPU.

Every cell type and direction option is also checked against the scan path in
test_models.py (test_fast_recurrence_*)."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding

import sequencer_jax as sj
from sequencer_jax.models import pallas_recurrence, recurrent

TRITON_CALL = '__gpu$xla.gpu.triton'
LIBTPU = importlib.util.find_spec('libtpu') is not None


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


@pytest.mark.skipif(not LIBTPU, reason='needs libtpu: pip install "jax[tpu]"')
@pytest.mark.parametrize('cell', recurrent.CELL_TYPES)
def test_forward_and_backward_compile_to_mosaic_kernels_for_a_tpu(cell, monkeypatch):
    """libtpu compiles both kernels for a TPU v4 chip (the least scoped VMEM, 16 MiB) from
    this host: Mosaic takes every op and layout, and at 56 steps of hidden 96 (stage 1 of
    Sequencer2D at 784 px) the block shrinks to fit VMEM (at 32 sequences the LSTM and GRU
    backward need about 20 MiB)."""
    # libtpu allows one process per machine unless told otherwise (parallel test workers).
    monkeypatch.setenv('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    device = topologies.get_topology_desc(topology_name='v4:2x2x1', platform='tpu').devices[0]
    model = sj.BiRNN2D(96, cell=cell, recurrence='pallas')
    x = jax.ShapeDtypeStruct((2, 56, 56, 16), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    on_tpu = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, a.dtype, sharding=SingleDeviceSharding(device)), (variables, x))
    grad = jax.jit(jax.grad(lambda v, x: jnp.sum(model.apply(v, x)), argnums=(0, 1)))
    compiled = grad.lower(*on_tpu).compile().as_text()
    assert compiled.count('custom_call_target="tpu_custom_call"') == 2  # forward, backward


def test_tpu_blocks_fit_vmem():
    """The block halves (down to 8 sequences) until a program's blocks fit the budget."""
    lstm_backward = lambda t, dp: [(t, 4, 2048, 4 * dp)] * 2 + [(t, 4, 2048, dp)] * 3  # noqa: E731
    assert pallas_recurrence._tpu_block(32, lstm_backward(32, 64)) == 32
    assert pallas_recurrence._tpu_block(32, lstm_backward(56, 128)) == 16
    assert pallas_recurrence._tpu_block(32, lstm_backward(512, 128)) == 8
    for t in (8, 32, 56, 128):
        shapes = lstm_backward(t, 128)
        block = pallas_recurrence._tpu_block(64, shapes)
        per_sequence = sum(s[0] * np.prod(s[3:]) * 4 for s in shapes)
        assert 2 * block * per_sequence <= pallas_recurrence._TPU_VMEM_BUDGET
        assert 64 % block == 0 and (block == 64 or 4 * block * per_sequence
                                    > pallas_recurrence._TPU_VMEM_BUDGET)


def test_clear_errors(monkeypatch):
    gx = jnp.zeros((3, 2, 4, 4 * 8))
    weights = recurrent.RecurrentWeights(8).init_with_output(jax.random.PRNGKey(0), 5)[0]
    cell = recurrent.get_cell('lstm')
    with pytest.raises(ValueError, match='power of two >= 16'):
        pallas_recurrence.run_recurrence_pallas(gx, weights, cell, (False, True), block=24)
    with pytest.raises(ValueError, match='reverse has 1 entries for 2 recurrences'):
        pallas_recurrence.run_recurrence_pallas(gx, weights, cell, (False,))
    monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
    long_gx = jnp.zeros((300, 2, 8, 4 * 96))
    long_weights = recurrent.RecurrentWeights(96).init_with_output(jax.random.PRNGKey(0), 5)[0]
    with pytest.raises(ValueError, match="all 300 steps .* Use recurrence='natural'"):
        pallas_recurrence.run_recurrence_pallas(long_gx, long_weights, cell, (False, True))
    with pytest.raises(ValueError, match="Unknown recurrence 'cudnn'"):
        sj.BiRNN2D(8, recurrence='cudnn')
