"""The fused Pallas recurrence: parity with the nn.scan path (kernels interpreted on CPU),
several program blocks, bfloat16, whole models, lowering to Triton for a GPU, the TPU
form in Pallas' TPU interpreter, and (where libtpu is installed) compiling with Mosaic
for a TPU.

Every cell type and direction option is also checked against the scan path in
test_models.py (test_fast_recurrence_*)."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental import topologies
from jax.experimental.pallas import tpu as pl_tpu
from jax.sharding import SingleDeviceSharding

import sequencer_jax as sj
from sequencer_jax.models import pallas_recurrence, recurrent
from sequencer_jax.train import mesh as mesh_lib

TRITON_CALL = '__gpu$xla.gpu.triton'
LIBTPU = importlib.util.find_spec('libtpu') is not None


def _outputs_and_grads(models, variables, x):
    loss = lambda m: lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)))  # noqa: E731
    return [(m.apply(variables, x), jax.grad(loss(m), argnums=(0, 1))(variables, x))
            for m in models]


def _placed(tree, sharding):
    """The shapes of ``tree`` laid out by ``sharding``, for compiling without arrays."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        tree)


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


def test_batch_split_over_a_mesh_runs_each_device_on_its_sequences():
    """Under ``jax.set_mesh`` (8 CPU devices, batch 8 split over both mesh axes) the
    kernels run inside shard_map on each device's sequences, as XLA cannot partition a
    Mosaic or Triton kernel (on a multi-chip TPU it refuses to), and the values and
    gradients equal the scan path's on one device."""
    mesh = mesh_lib.make_mesh([('data', 4), ('fsdp', 2)])
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 3, 12, 8))
    fused, reference = (sj.BiRNN2D(16, cell='gru', recurrence=r) for r in ('pallas', 'scan'))
    variables = reference.init(jax.random.PRNGKey(1), x)
    (y_ref, grads_ref), = _outputs_and_grads((reference,), variables, x)
    with jax.set_mesh(mesh):
        (y, grads), = jax.jit(_outputs_and_grads, static_argnums=0)(
            (fused,), jax.device_put(variables, mesh_lib.replicated(mesh)),
            jax.device_put(x, mesh_lib.batch_sharding(mesh)))
    assert y.sharding.is_equivalent_to(mesh_lib.batch_sharding(mesh), y.ndim)
    _assert_close(y, y_ref, 1e-5)
    _assert_close(grads, grads_ref, 1e-5, rtol=1e-5)  # weight gradients: sums of 8 shards


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


@pytest.mark.parametrize('cell', recurrent.CELL_TYPES)
@pytest.mark.parametrize('platform, call', [('cuda', TRITON_CALL), ('tpu', 'tpu_custom_call')])
def test_kernels_pass_shard_maps_type_checks_when_lowered_for_a_device(platform, call, cell):
    """Inside ``jax.shard_map`` with its default ``check_vma=True`` (8 devices), the
    gradient lowers for a GPU and a TPU: the kernels' outputs vary over the manual axis as
    their inputs do. (On CPU Pallas' interpreter itself fails that check; see
    test_models.py's shard_map test.)"""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    model = sj.BiRNN2D(6, cell=cell, recurrence='pallas')
    x = jnp.ones((8, 5, 5, 8))
    variables = model.init(jax.random.PRNGKey(0), x)
    mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Explicit,))
    grad = jax.grad(lambda v, x: jnp.sum(model.apply(v, x) ** 2))
    sharded = (jax.device_put(variables, NamedSharding(mesh, P())),
               jax.device_put(x, NamedSharding(mesh, P('data'))))
    exported = export.export(
        jax.jit(jax.shard_map(grad, mesh=mesh, in_specs=(P(), P('data')), out_specs=P())),
        platforms=[platform],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(call)])(*sharded)
    assert exported.mlir_module().count(call) == 2  # forward and backward


@pytest.mark.parametrize('cell', recurrent.CELL_TYPES)
def test_tpu_form_interpreted_equals_the_scan_path(cell, monkeypatch):
    """The TPU form (one step per program, the carry in VMEM scratch, time reversed by
    the index maps) in Pallas' TPU interpreter on CPU: values, gradients and the tangent
    kernel (jax.jvp w.r.t. the input), with a VMEM budget so small that each
    recurrence takes 4 (forward) and 8 (backward) blocks."""
    monkeypatch.setattr(pallas_recurrence, '_on_platform', lambda loop_call, step_call:
                        step_call(interpret=pl_tpu.InterpretParams()))
    monkeypatch.setattr(pallas_recurrence, '_TPU_VMEM_BUDGET', 16384)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 12, 8))
    fused, reference = (sj.BiRNN2D(16, cell=cell, recurrence=r) for r in ('pallas', 'scan'))
    variables = reference.init(jax.random.PRNGKey(1), x)
    (y, grads), (y_ref, grads_ref) = _outputs_and_grads((fused, reference), variables, x)
    _assert_close(y, y_ref, 1e-5, 1e-6)
    _assert_close(grads, grads_ref, 1e-5, 1e-6)
    dx = jax.random.normal(jax.random.PRNGKey(2), x.shape)
    tangent, tangent_ref = (jax.jvp(lambda x: m.apply(variables, x), (x,), (dx,))[1]
                            for m in (fused, reference))
    _assert_close(tangent, tangent_ref, 1e-5, 1e-6)


def test_nested_vmaps_of_the_kernels_split_over_a_mesh():
    """An ensemble (the weights mapped: folded into the recurrences) and, nested, a map
    over inputs with shared weights (folded into the sequences) under ``jax.set_mesh``
    (8 devices), where the folded launch is split over the devices: values and
    gradients equal the scan path's."""
    mesh = mesh_lib.make_mesh([('data', 4), ('fsdp', 2)])
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 3, 4, 8))
    fused, reference = (sj.BiRNN2D(6, recurrence=r) for r in ('pallas', 'scan'))
    ensemble = jax.vmap(reference.init, in_axes=(0, None))(
        jax.random.split(jax.random.PRNGKey(2), 2), x)

    def outputs(model):
        loss = lambda v, x: jnp.sum(jnp.sin(model.apply(v, x)))  # noqa: E731
        members = jax.vmap(lambda v: (model.apply(v, x), jax.grad(loss)(v, x)))
        each_row = jax.vmap(jax.vmap(lambda v, row: model.apply(v, row[None, None]),
                                     in_axes=(0, None)), in_axes=(None, 0))
        return jax.jit(members)(ensemble), jax.jit(each_row)(ensemble, x[:2, 0])

    expected = outputs(reference)
    with jax.set_mesh(mesh):
        _assert_close(outputs(fused), expected, 1e-5, 1e-6)


def test_tpu_blocks_fit_vmem():
    """Sequences per TPU step: the largest multiple of 8 dividing N that fits the budget."""
    def lstm_backward(n, dp):
        return [(56, 4, n, 4 * dp)] * 2 + [(56, 4, n, dp)] * 3

    per_sequence = 5632  # bytes of one step of one sequence at Dp = 128
    assert pallas_recurrence._tpu_block(2048, lstm_backward(2048, 128)) == 256
    assert pallas_recurrence._tpu_block(3584, lstm_backward(3584, 128)) == 256
    assert pallas_recurrence._tpu_block(448, lstm_backward(448, 128)) == 224
    assert pallas_recurrence._tpu_block(96, lstm_backward(96, 128)) == 96
    assert pallas_recurrence._tpu_block(2048, lstm_backward(2048, 64)) == 512
    for n in (96, 448, 2048, 3584):
        block = pallas_recurrence._tpu_block(n, lstm_backward(n, 128))
        assert n % block == 0 and block % 8 == 0
        assert 2 * block * per_sequence <= pallas_recurrence._TPU_VMEM_BUDGET


@pytest.mark.skipif(not LIBTPU, reason='needs libtpu: pip install "jax[tpu]"')
@pytest.mark.parametrize('cell', recurrent.CELL_TYPES)
def test_forward_and_backward_compile_to_mosaic_kernels_for_a_tpu(cell, monkeypatch):
    """libtpu compiles both kernels for a TPU v4 chip (the least scoped VMEM, 16 MiB) from
    this host: Mosaic takes every op, layout and index map, and the largest step blocks
    (224 of 448 sequences, hidden 96) fit VMEM with the kernels' temporaries."""
    # libtpu allows one process per machine unless told otherwise (parallel test workers).
    monkeypatch.setenv('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    device = topologies.get_topology_desc(topology_name='v4:2x2x1', platform='tpu').devices[0]
    model = sj.BiRNN2D(96, cell=cell, recurrence='pallas')
    x = jax.ShapeDtypeStruct((8, 56, 56, 16), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    on_tpu = _placed((variables, x), SingleDeviceSharding(device))
    grad = jax.jit(jax.grad(lambda v, x: jnp.sum(model.apply(v, x)), argnums=(0, 1)))
    compiled = grad.lower(*on_tpu).compile().as_text()
    assert compiled.count('custom_call_target="tpu_custom_call"') == 2  # forward, backward


@pytest.mark.skipif(not LIBTPU, reason='needs libtpu: pip install "jax[tpu]"')
def test_kernels_split_over_a_mesh_of_tpu_chips(monkeypatch):
    """Compiled for 4 TPU v5e chips with the batch split over the mesh (as the trainer
    runs it), each chip's two kernels take its quarter of the 2,048 sequences and no
    activation is gathered (without the split, Mosaic refuses: its kernels "cannot be
    automatically partitioned")."""
    monkeypatch.setenv('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    devices = topologies.get_topology_desc(topology_name='v5e:2x2', platform='tpu').devices
    mesh = mesh_lib.make_mesh([('data', -1), ('fsdp', 1)], devices)
    model = sj.BiRNN2D(48, recurrence='pallas')
    x = jax.ShapeDtypeStruct((64, 32, 32, 16), jnp.float32,
                             sharding=mesh_lib.batch_sharding(mesh))
    variables = _placed(jax.eval_shape(model.init, jax.random.PRNGKey(0), x),
                        mesh_lib.replicated(mesh))
    grad = jax.jit(jax.grad(lambda v, x: jnp.sum(model.apply(v, x)), argnums=(0, 1)))
    with jax.set_mesh(mesh):
        compiled = grad.lower(variables, x).compile().as_text()
    calls = [line for line in compiled.splitlines()
             if 'custom_call_target="tpu_custom_call"' in line]
    assert len(calls) == 2 and all('f32[32,4,512,' in call for call in calls)
    assert 'all-gather' not in compiled


def test_clear_errors():
    gx = jnp.zeros((3, 2, 4, 4 * 8))
    weights = recurrent.RecurrentWeights(8).init_with_output(jax.random.PRNGKey(0), 5)[0]
    cell = recurrent.get_cell('lstm')
    with pytest.raises(ValueError, match='power of two >= 16'):
        pallas_recurrence.run_recurrence_pallas(gx, weights, cell, (False, True), block=24)
    with pytest.raises(ValueError, match='reverse has 1 entries for 2 recurrences'):
        pallas_recurrence.run_recurrence_pallas(gx, weights, cell, (False,))
    with pytest.raises(ValueError, match="Unknown recurrence 'cudnn'"):
        sj.BiRNN2D(8, recurrence='cudnn')


@pytest.mark.parametrize('form', ['gpu', 'tpu'])
def test_vmapped_kernels_equal_the_scan_path(form, monkeypatch):
    """jax.jacfwd (a vmap of the tangent kernel), vmap of grad (per-example gradients:
    the backward kernel under vmap) and an ensemble (vmap over the weights, forward and
    grad), through the GPU form and the TPU form, both interpreted on CPU."""
    if form == 'tpu':
        monkeypatch.setattr(pallas_recurrence, '_on_platform', lambda loop_call, step_call:
                            step_call(interpret=pl_tpu.InterpretParams()))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4, 8))
    fused, reference = (sj.BiRNN2D(6, recurrence=r) for r in ('pallas', 'scan'))
    variables = reference.init(jax.random.PRNGKey(1), x)
    ensemble = jax.vmap(reference.init, in_axes=(0, None))(
        jax.random.split(jax.random.PRNGKey(2), 2), x)

    def derivatives(model):
        loss = lambda v, x: jnp.sum(jnp.sin(model.apply(v, x)))  # noqa: E731
        jacobian = jax.jacfwd(lambda row: model.apply(variables, x.at[1, 2].set(row)))
        per_example = jax.vmap(jax.grad(lambda x: loss(variables, x[None])))
        members = jax.vmap(lambda v: (model.apply(v, x), jax.grad(loss)(v, x)))
        return (jax.jit(jacobian)(x[1, 2]), jax.jit(per_example)(x),
                jax.jit(members)(ensemble))

    expected = derivatives(reference)
    assert np.abs(expected[0]).max() > 1e-2
    _assert_close(derivatives(fused), expected, 1e-5, 1e-6)
