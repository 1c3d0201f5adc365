"""Every compiled binary kernel equals the numpy reference bit for bit (int32 results)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel_utils import random_activations, random_layer, run_binary, run_sparks
from sparks_tvm import reference as ref
from sparks_tvm.kernels import ConvGeometry


@st.composite
def layers(draw, max_channels=70):
    stride = draw(st.sampled_from([1, 2]))
    pad = draw(st.sampled_from([(1, 1, 1, 1), (0, 0, 0, 0), (1, 0, 1, 0), (0, 1, 1, 0)]))
    h = draw(st.integers(3, 13))
    w = draw(st.integers(3, 13))
    geom = ConvGeometry(
        batch=draw(st.integers(1, 3)),
        in_channels=draw(st.integers(1, max_channels)),
        height=h,
        width=w,
        out_channels=draw(st.integers(1, 40)),
        stride=(stride, stride),
        padding=pad,
    )
    k = draw(st.integers(2, 64))
    mode = draw(st.sampled_from(["sign", "ge", "gt"]))
    seed = draw(st.integers(0, 2**31))
    return geom, k, mode, seed


def test_references_agree(rng):
    """The two-stage Sparks reference equals a dense binary conv with codebook[idx] kernels."""
    geom = ConvGeometry(2, 7, 9, 8, 5, stride=(2, 2))
    codebook, idx = random_layer(rng, geom, 6)
    a = ref.binarize(random_activations(rng, geom.in_shape), "sign")
    assert np.array_equal(ref.sparks_conv2d_ref(a, codebook, idx, geom.stride, geom.padding),
                          ref.binary_conv2d_ref(a, codebook[idx], geom.stride, geom.padding))


def test_reference_zero_and_padding_rules():
    """Hand-checked: a zero activation and padded taps contribute 0, not +-1."""
    a = np.zeros((1, 1, 1, 1), np.int8)
    w = np.ones((1, 1, 3, 3), np.int8)
    assert ref.binary_conv2d_ref(a, w, padding=(1, 1, 1, 1))[0, 0, 0, 0] == 0
    a[...] = -1
    assert ref.binary_conv2d_ref(a, w, padding=(1, 1, 1, 1))[0, 0, 0, 0] == -1
    assert ref.binarize(np.array([0.0], np.float32), "sign")[0] == 0
    assert ref.binarize(np.array([0.0], np.float32), "ge")[0] == 1
    assert ref.binarize(np.array([0.0], np.float32), "gt")[0] == -1


@given(layers())
def test_sparks_kernel_exact(host, case):
    geom, k, mode, seed = case
    rng = np.random.default_rng(seed)
    codebook, idx = random_layer(rng, geom, k)
    x = random_activations(rng, geom.in_shape)
    expect = ref.sparks_conv2d_ref(ref.binarize(x, mode), codebook, idx, geom.stride, geom.padding)
    assert np.array_equal(run_sparks(host, geom, x, codebook, idx, mode), expect)


@given(layers(max_channels=100))
def test_binary_kernel_exact(host, case):
    geom, k, mode, seed = case
    rng = np.random.default_rng(seed)
    codebook, idx = random_layer(rng, geom, k)
    signs = codebook[idx]
    x = random_activations(rng, geom.in_shape)
    expect = ref.binary_conv2d_ref(ref.binarize(x, mode), signs, geom.stride, geom.padding)
    assert np.array_equal(run_binary(host, geom, x, signs, mode), expect)


@pytest.mark.parametrize("kernel", [(5, 5), (1, 1), (3, 1)])
def test_binary_kernel_other_sizes(host, rng, kernel):
    geom = ConvGeometry(2, 33, 9, 10, 7, kernel=kernel, stride=(1, 2), padding=(kernel[0] // 2, 0, kernel[0] // 2, 1))
    signs = np.where(rng.random((7, 33) + kernel) < 0.5, -1, 1).astype(np.int8)
    x = random_activations(rng, geom.in_shape)
    expect = ref.binary_conv2d_ref(ref.binarize(x, "sign"), signs, geom.stride, geom.padding)
    assert np.array_equal(run_binary(host, geom, x, signs, "sign"), expect)


def test_unscheduled_sparks_compute_exact(host, rng):
    """The plain TE definition (no schedule) is itself correct: schedules only reorder it."""
    geom = ConvGeometry(3, 5, 7, 9, 6, stride=(2, 2))
    codebook, idx = random_layer(rng, geom, 4)
    x = random_activations(rng, geom.in_shape)
    expect = ref.sparks_conv2d_ref(ref.binarize(x, "sign"), codebook, idx, geom.stride, geom.padding)
    assert np.array_equal(run_sparks(host, geom, x, codebook, idx, "sign", scheduled=False), expect)


@pytest.mark.parametrize("channels", [3640, 3700])
def test_sparks_accumulator_limits(host, rng, channels):
    """Stage 2 sums biased responses S + 9 (0..18): uint16 while 18 * C <= 65535 (C = 3640
    reaches 65520), int32 past it (C = 3700). All-(-1) inputs reach the extreme sums."""
    geom = ConvGeometry(1, channels, 3, 3, 2)
    codebook = np.ones((2, 3, 3), np.int8)
    codebook[1] = -1
    idx = np.zeros((2, channels), np.int32)
    idx[1] = 1
    x = -np.ones(geom.in_shape, np.float32)
    out = run_sparks(host, geom, x, codebook, idx, "sign")
    assert out[0, 0, 1, 1] == -9 * channels and out[0, 1, 1, 1] == 9 * channels
    expect = ref.sparks_conv2d_ref(ref.binarize(x, "sign"), codebook, idx, geom.stride, geom.padding)
    assert np.array_equal(out, expect)


@pytest.mark.parametrize("shape", [(64, 56, 64), (128, 28, 128), (512, 7, 512)])
def test_resnet18_layer_shapes_exact(host, rng, shape):
    cin, hw, cout = shape
    geom = ConvGeometry(1, cin, hw, hw, cout)
    codebook, idx = random_layer(rng, geom, 16)
    x = random_activations(rng, geom.in_shape)
    expect = ref.sparks_conv2d_ref(ref.binarize(x, "sign"), codebook, idx, geom.stride, geom.padding)
    assert np.array_equal(run_sparks(host, geom, x, codebook, idx, "sign"), expect)


def test_single_codeword_layer(host, rng):
    """K = 1: the codeword loop disappears from the schedule; results stay exact."""
    geom = ConvGeometry(2, 9, 6, 7, 5, stride=(2, 2))
    codebook, idx = random_layer(rng, geom, 1)
    x = random_activations(rng, geom.in_shape)
    expect = ref.sparks_conv2d_ref(ref.binarize(x, "sign"), codebook, idx, geom.stride, geom.padding)
    assert np.array_equal(run_sparks(host, geom, x, codebook, idx, "sign"), expect)


def test_output_channel_chunks_exact(rng):
    """Few pixel tiles -> output channels split across threads; still exact."""
    from schedules.host import HostSchedules
    from sparks_tvm.target import host_target
    import tvm

    geom = ConvGeometry(1, 40, 7, 7, 50)
    assert HostSchedules(cores=4).sparks_params(geom, 16)["o_chunks"] > 1
    target = tvm.target.Target(dict(host_target().export(), **{"num-cores": 4}))
    codebook, idx = random_layer(rng, geom, 16)
    x = random_activations(rng, geom.in_shape)
    expect = ref.sparks_conv2d_ref(ref.binarize(x, "sign"), codebook, idx, geom.stride, geom.padding)
    assert HostSchedules.for_target(target).cores == 4
    assert np.array_equal(run_sparks(target, geom, x, codebook, idx, "sign"), expect)


@pytest.mark.parametrize(
    "vector_bytes, cin, k",
    [
        (64, 37, 16),  # C not a multiple of the int8 group: a tail group with skipped channels
        (64, 200, 16),  # several channel blocks, the last one partial
        (64, 24, 13),  # K not a power of two: clamped codeword index
        (64, 20, 64),  # K=64: a channel block of 4
        (32, 50, 16),  # AVX2-sized tile (T=32)
        (16, 9, 8),  # NEON-sized vectors
    ],
)
def test_schedule_knobs_exact(rng, vector_bytes, cin, k):
    """Every default-knob regime (tile, channel block, tail, index forcing) stays exact."""
    from schedules.host import HostSchedules, schedule_sparks_conv2d
    from sparks_tvm.kernels import pack_indices, sparks_conv2d_primfunc, sparks_out_shape
    from sparks_tvm.target import host_target
    import tvm

    geom = ConvGeometry(2, cin, 9, 11, 19, stride=(2, 1), padding=(1, 0, 1, 2))
    sched = HostSchedules(cores=2, vector_bytes=vector_bytes)
    knobs = sched.sparks_params(geom, k)
    func = schedule_sparks_conv2d(sparks_conv2d_primfunc(geom, k, "sign", knobs["tile"]), **knobs)
    codebook, idx = random_layer(rng, geom, k)
    x = random_activations(rng, geom.in_shape)
    lib = tvm.compile(func.with_attr("global_symbol", "main"), target=host_target()).jit()
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(sparks_out_shape(geom), np.int32), dev)
    lib["main"](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(ref.codes_to_bits(codebook), dev),
                tvm.runtime.tensor(pack_indices(idx, k), dev), out)
    expect = ref.sparks_conv2d_ref(ref.binarize(x, "sign"), codebook, idx, geom.stride, geom.padding)
    assert np.array_equal(out.numpy().reshape(geom.out_shape), expect)


@pytest.mark.parametrize("group", [1, 5, 14])
def test_int8_group_sums_at_their_limit(group):
    """Every response +-9 (uniform input, matching/opposite codewords): the uint8 partial sum of
    biased responses (S + 9) of a full group reaches 18*G (252 at G=14) without overflowing; a
    tail group adds its part."""
    from schedules.host import schedule_sparks_conv2d
    from sparks_tvm.kernels import pack_indices, sparks_conv2d_primfunc, sparks_out_shape
    from sparks_tvm.target import host_target
    import tvm

    geom = ConvGeometry(1, 2 * group + 3, 5, 5, 2, padding=(0, 0, 0, 0))
    codebook = np.stack([-np.ones((3, 3)), np.ones((3, 3))]).astype(np.int8)
    idx = np.zeros((2, geom.in_channels), np.int64)
    idx[1] = 1
    x = -np.ones(geom.in_shape, np.float32)
    func = schedule_sparks_conv2d(sparks_conv2d_primfunc(geom, 2, "sign", 32, group), tile=32, block=2)
    lib = tvm.compile(func.with_attr("global_symbol", "main"), target=host_target()).jit()
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(sparks_out_shape(geom), np.int32), dev)
    lib["main"](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(ref.codes_to_bits(codebook), dev),
                tvm.runtime.tensor(pack_indices(idx, 2), dev), out)
    got = out.numpy().reshape(geom.out_shape)
    assert (got[0, 0] == 9 * geom.in_channels).all() and (got[0, 1] == -9 * geom.in_channels).all()


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8, 16, 17, 32, 64, 256, 300])
def test_index_packing_roundtrip(rng, k):
    """Indices are stored tau bits each (rounded to 1/2/4/8); unpacking gives them back."""
    from sparks_tvm.kernels import index_bits, pack_indices, unpack_indices

    idx = rng.integers(0, k, size=(7, 37))
    packed = pack_indices(idx, k)
    bits = index_bits(k)
    assert bits >= max(1, (k - 1).bit_length())
    if bits < 16:
        assert packed.dtype == np.uint8 and packed.shape == (7, -(-37 * bits // 8))
    assert np.array_equal(unpack_indices(packed, k, 37), idx)
    with pytest.raises(ValueError):
        pack_indices(np.full((2, 2), k), k)


@pytest.mark.parametrize(
    "geom, tile",
    [
        (ConvGeometry(1, 5, 7, 7, 3), 64),  # 49 pixels, 15 padding pixels: rows read past the image
        (ConvGeometry(2, 3, 6, 1, 4), 64),  # OW = 1: 58 padding pixels, each its own row
        (ConvGeometry(1, 4, 9, 9, 5, padding=(0, 0, 0, 0)), 16),  # unpadded: the extra rows are all padding
        (ConvGeometry(1, 6, 8, 5, 3, padding=(0, 1, 2, 0)), 256),  # asymmetric, bottom rows padded by 2
        (ConvGeometry(1, 3, 5, 5, 2, stride=(1, 2)), 32),  # row stride 1, column stride 2
    ],
)
def test_flat_patch_planes_exact(rng, geom, tile):
    """At row stride 1 the patch planes are flat over the padded pixels and read row triples
    past the image (their rows extended with zero padding): stored pixels stay exact, the
    triples cover every row read, and the plane really is flat (so this covers that path)."""
    from schedules.host import schedule_sparks_conv2d
    from sparks_tvm.kernels import pack_indices, sparks_conv2d_primfunc, sparks_out_shape
    from sparks_tvm.kernels.sparks_conv2d import padded_pixels
    from sparks_tvm.target import host_target
    import tvm

    func = sparks_conv2d_primfunc(geom, 8, "sign", tile)
    bufs = {b.name: b for b in func.body.block.alloc_buffers}
    ppad = padded_pixels(geom, tile)
    assert [int(d) for d in bufs["patch_neg"].shape] == [geom.batch, geom.in_channels, ppad]
    # Pixel p reads triple rows p // OW + 0..2: the triples must have that many rows (reads
    # past a TVM buffer are not bound-checked, so this is asserted, not left to chance).
    assert int(bufs["row_triple"].shape[2]) >= -(-ppad // geom.out_width) + 2
    lib = tvm.compile(schedule_sparks_conv2d(func, tile=tile, block=1).with_attr("global_symbol", "main"),
                      target=host_target()).jit()
    codebook, idx = random_layer(rng, geom, 8)
    x = random_activations(rng, geom.in_shape)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(sparks_out_shape(geom), np.int32), dev)
    lib["main"](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(ref.codes_to_bits(codebook), dev),
                tvm.runtime.tensor(pack_indices(idx, 8), dev), out)
    expect = ref.sparks_conv2d_ref(ref.binarize(x, "sign"), codebook, idx, geom.stride, geom.padding)
    assert np.array_equal(out.numpy().reshape(geom.out_shape), expect)
