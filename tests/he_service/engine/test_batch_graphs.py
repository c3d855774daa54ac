"""The batch plan on residual graphs: levels and scales of joins, simulated and encrypted.

``random_residual_network`` (conv and vector blocks, identity and projected skips, nesting,
pools) and ``random_graph_network`` below (activations of degree 2-4 anywhere, joins of two
activations, skips from the input, joins before an activation or the output) compile, match
the network in plain simulation (exact and with the integer weights) and encrypted; the
shipped chain models keep their parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
import tenseal.sealapi as seal

from he_service.artifacts import Add, Layer, Linear, ModelArtifact, Poly
from he_service.engine import CompileError
from he_service.engine.batch import BatchAffine, BatchEvaluator, BatchPlan, compile_batch_plan
from he_service.engine.batch.compiler import _network, _poly_of
from he_service.engine.batch.parameters import ParameterChoice, choose_parameters, drop_primes
from he_service.engine.batch.plan import INPUT, FloatPoly
from he_service.engine.batch.products import reduce_mod, shift_mod
from he_service.engine.graph import build_graph
from he_service.protocol import save_seal
from he_service.protocol.batch_encoding import encode_batch
from he_service.protocol.params import CkksParams

from .batch_keys import Keys, check_simulation, forward, run_encrypted
from .networks import make_artifact, random_network, random_residual_network


def random_graph_network(rng: np.random.Generator) -> tuple[ModelArtifact, np.ndarray]:
    """Return a random residual MLP beyond ``random_residual_network``, and one input.

    Activations of degree 2 to 4 anywhere; blocks whose branches are the identity, a
    projection, a map and an activation (so a join of two activations), a classic
    map-activation-map, or a nested block; joins right before an activation or the output;
    skips from the input itself. Weights and coefficients keep values near 1.
    """
    width = int(rng.integers(3, 12))

    def poly(low: int = 2, high: int = 5) -> Poly:
        degree = int(rng.integers(low, high))
        coeffs = [rng.normal() * 0.1, 0.5 + rng.normal() * 0.2, 0.1 + abs(rng.normal()) * 0.1]
        if degree >= 3:  # a leading coefficient far from zero: no huge shift inside the step
            coeffs += [rng.normal() * 0.02] * (degree - 3)
            coeffs.append(float(rng.choice([-1.0, 1.0])) * (0.05 + abs(rng.normal()) * 0.05))
        return Poly(tuple(coeffs))

    def linear() -> Linear:
        weight = rng.normal(size=(width, width)) * 0.7 / np.sqrt(width)
        return Linear(weight, rng.normal(size=width) * 0.1)

    def branch(depth: int) -> tuple[Layer, ...]:
        kind = int(rng.integers(0, 5))
        if kind == 4 and depth < 1:
            return (Add((branch(depth + 1), branch(depth + 1))), poly(), linear())
        options: list[tuple[Layer, ...]] = [
            (),
            (linear(),),
            (linear(), poly()),
            (linear(), poly(), linear()),
            (linear(), poly()),
        ]
        return options[kind]

    layers: list[Layer] = []
    if rng.random() < 0.6:
        layers += [linear(), poly()]
    for _ in range(int(rng.integers(1, 3))):
        first, second = branch(0), branch(0)
        if len(first) < 2 and len(second) < 2:
            second = (linear(), poly())
        layers.append(Add((first, second)))
        if rng.random() < 0.5:
            layers.append(poly(2, 3))
    outputs = int(rng.integers(2, 6))
    weight = rng.normal(size=(outputs, width)) / np.sqrt(width)
    layers.append(Linear(weight, rng.normal(size=outputs) * 0.1))
    return make_artifact(layers, (width,)), rng.normal(size=(width,))


def _choice(artifact: ModelArtifact) -> ParameterChoice:
    """Return the compiler's parameter choice with its schedule (what the plan is built from)."""
    steps = _network(build_graph(artifact))
    polys = {
        index: replace(_poly_of(step.step), source=step.source)
        for index, step in enumerate(steps)
        if isinstance(step, FloatPoly)
    }
    return choose_parameters(steps, polys)


def _check_simulation(artifact: ModelArtifact, rng: np.random.Generator) -> BatchPlan:
    plan = check_simulation(artifact, rng.normal(size=(9, *artifact.input_shape)))
    assert plan.summary()["residual_joins"] >= 1
    return plan


# ---- compilation and plain simulation


@pytest.mark.parametrize("seed", range(40))
def test_residual_networks_compile_and_simulate_exactly(seed: int) -> None:
    rng = np.random.default_rng(seed)
    artifact, _ = random_residual_network(rng)
    _check_simulation(artifact, rng)


@pytest.mark.parametrize("seed", range(40))
def test_graph_networks_compile_and_simulate_exactly(seed: int) -> None:
    rng = np.random.default_rng(seed)
    artifact, _ = random_graph_network(rng)
    _check_simulation(artifact, rng)


@pytest.mark.parametrize("seed", range(20))
def test_every_term_of_a_join_lands_on_one_scale(seed: int) -> None:
    """Levels line up, shifts are exact powers of two, weights keep their bits."""
    rng = np.random.default_rng(seed)
    artifact, _ = (random_graph_network if seed % 2 else random_residual_network)(rng)
    plan = compile_batch_plan(artifact)
    choice = _choice(artifact)
    primes = drop_primes(plan.params)
    levels = {INPUT: 0}
    for index, layer in enumerate(plan.layers):
        if not isinstance(layer, BatchAffine):
            levels[index] = levels[layer.source]
            continue
        bits = choice.schedule[index].weight_bits
        for term in layer.terms:
            assert levels[term.source] + len(term.align) == layer.level
            assert term.shift >= 0
            landed = term.source_scale * term.weight_scale * 2.0**term.shift
            assert landed == pytest.approx(layer.scale, rel=1e-12)
            largest = float(np.abs(term.weights).max())
            assert largest <= 2.0 ** (bits + 1) + 1  # a shift, never wider integers
        levels[index] = layer.level + layer.rescales
        assert layer.level + layer.rescales <= len(primes)


def test_parallel_activations_share_their_levels_primes() -> None:
    """A join of two activations: the second branch drops the first's primes, exactly."""
    rng = np.random.default_rng(0)
    width = 6

    def linear(gain: float) -> Linear:
        return Linear(rng.normal(size=(width, width)) * gain, rng.normal(size=width) * 0.1)

    square, cubic = Poly((0.0, 0.5, 0.2)), Poly((0.0, 0.4, 0.1, 0.08))
    artifact = make_artifact(
        [
            linear(0.3),
            square,
            Add(((linear(0.01), square), (linear(0.3), square))),  # the second needs less
            cubic,
            Linear(rng.normal(size=(3, width)), np.zeros(3)),
        ],
        (width,),
    )
    choice = _choice(artifact)
    shared = [i for i, s in choice.schedule.items() if s.reference is None]
    assert shared, "the second branch lands on the first branch's primes"
    primes = drop_primes(choice.params)
    for index in shared:
        plan = choice.schedule[index]
        landed = choice.product_scales[index]
        for q in primes[plan.level : plan.level + plan.drops]:
            landed = landed / float(q)
        assert landed == pytest.approx(choice.params.scale, rel=1e-12)
    _check_simulation(artifact, rng)


def test_shipped_chain_models_keep_their_parameters() -> None:
    from he_service.artifacts import load_artifact
    from he_service.config import DEFAULT_MODELS_DIR

    expected = {  # the chain-only compiler's choices, before residual joins
        "mnist-cnn": CkksParams(8192, (38, 50, 38, 39, 53), 24),
        "digits-cnn": CkksParams(8192, (38, 51, 38, 39, 52), 25),
        "breast-cancer-mlp": CkksParams(8192, (38, 50, 39, 39, 52), 25),
    }
    for name, params in expected.items():
        plan = compile_batch_plan(load_artifact(DEFAULT_MODELS_DIR / name))
        assert plan.params == params
        assert plan.params_reason["rescales_after_affine"] == [0, 2, 1]
        for layer in plan.layers:
            if isinstance(layer, BatchAffine):
                (term,) = layer.terms
                assert term.shift == 0 and not term.align


@pytest.mark.parametrize("seed", range(10))
def test_random_chains_have_no_joins(seed: int) -> None:
    artifact, _ = random_network(np.random.default_rng(seed))
    plan = compile_batch_plan(artifact)
    assert "residual_joins" not in plan.summary()
    assert all(
        len(layer.terms) == 1 and layer.terms[0].shift == 0
        for layer in plan.layers
        if isinstance(layer, BatchAffine)
    )


def test_too_deep_residual_network_is_refused_naming_why() -> None:
    layers: list[Layer] = []
    quartic = Poly((0.0, 0.1, 0.2, 0.05, 0.1))
    for _ in range(8):
        layers.append(Add(((), (Linear(np.eye(3) * 0.5, np.zeros(3)), quartic))))
    artifact = make_artifact([*layers, Linear(np.ones((1, 3)), np.zeros(1))], (3,))
    with pytest.raises(CompileError, match="do not fit CKKS parameters.*fewer or lower-degree"):
        compile_batch_plan(artifact)


# ---- exact arithmetic


@pytest.mark.parametrize(("degree", "bits"), [(8192, 60), (8192, 38), (16384, 45), (32768, 20)])
def test_shift_mod_is_exact_modular_arithmetic(degree: int, bits: int) -> None:
    q = seal.CoeffModulus.Create(degree, [bits])[0].value()
    rng = np.random.default_rng(bits)
    values = rng.integers(0, q, size=(3, 64), dtype=np.int64)
    values[0, 0], values[0, 1] = q - 1, 0
    spare = np.empty_like(values)
    for shift in (1, 7, 31, 59, 60, 61, 130):
        got = values.copy()
        shift_mod(got, shift, q, spare)
        expected = [[(int(v) << shift) % q for v in row] for row in values]
        assert got.tolist() == expected
    negative = -values
    reduce_mod(negative, q, spare, out=negative)
    assert negative.tolist() == [[(-int(v)) % q for v in row] for row in values]


# ---- encryption


@pytest.mark.parametrize(
    ("generator", "seed"),
    [
        (random_residual_network, 0),  # a skip from the input: a 60-bit shift
        (random_residual_network, 6),  # conv blocks; the skip is rescaled on its way down
        (random_residual_network, 22),  # conv blocks, projected skips
        (random_graph_network, 1),  # shared primes, a rescaled skip, the input, a cubic
        (random_graph_network, 8),  # quartics, a skip from the input
        (random_graph_network, 33),  # degrees 2 to 4, shared primes
    ],
)
def test_encrypted_residual_networks_match_plaintext(
    generator: Callable[[np.random.Generator], tuple[ModelArtifact, np.ndarray]],
    seed: int,
    keys: Callable[[CkksParams], Keys],
) -> None:
    rng = np.random.default_rng(seed)
    artifact, _ = generator(rng)
    plan = compile_batch_plan(artifact)
    samples = rng.normal(size=(50, *artifact.input_shape))
    got, _ = run_encrypted(plan, keys(plan.params), samples)
    expected = forward(artifact, samples)
    bound = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(got, expected, atol=2e-3 * bound)


@pytest.mark.parametrize(
    ("generator", "seed"), [(random_residual_network, 6), (random_graph_network, 1)]
)
def test_numpy_products_are_bit_identical_to_seal_on_joins(
    generator: Callable[[np.random.Generator], tuple[ModelArtifact, np.ndarray]],
    seed: int,
    keys: Callable[[CkksParams], Keys],
) -> None:
    """Modulus switches read as dropped limbs, shifts, mixed ciphertext sizes: all exact."""
    rng = np.random.default_rng(seed)
    artifact, _ = generator(rng)
    plan = compile_batch_plan(artifact)
    joins = [
        layer for layer in plan.layers if isinstance(layer, BatchAffine) and len(layer.terms) > 1
    ]
    assert any(any(t.align) for layer in joins for t in layer.terms)
    assert any(t.shift for layer in joins for t in layer.terms)
    samples = rng.normal(size=(20, *artifact.input_shape))
    fast, fast_cts = run_encrypted(plan, keys(plan.params), samples, backend="numpy")
    slow, slow_cts = run_encrypted(plan, keys(plan.params), samples, backend="seal")
    assert [save_seal(c) for c in fast_cts] == [save_seal(c) for c in slow_cts]
    np.testing.assert_array_equal(fast, slow)


# ---- memory: streaming a large layer into its reader


@pytest.mark.parametrize(
    ("generator", "seed"),
    [
        (random_network, 12),  # a chain: conv, cubic, dense
        (random_residual_network, 6),  # the stream's reader is a join
        (random_graph_network, 33),  # two streams, degrees 2 to 4
    ],
)
def test_streamed_layers_give_the_same_ciphertexts(
    generator: Callable[[np.random.Generator], tuple[ModelArtifact, np.ndarray]],
    seed: int,
    keys: Callable[[CkksParams], Keys],
) -> None:
    """Chunks of a layer, its activation and their share of the reader: the same integers."""
    rng = np.random.default_rng(seed)
    artifact, _ = generator(rng)
    plan = compile_batch_plan(artifact)
    k = keys(plan.params)
    (group,) = encode_batch(rng.normal(size=(20, *artifact.input_shape)), plan.slot_count)
    cts = k.encrypt(group)
    whole = BatchEvaluator(plan)
    assert not whole._streams  # small layers are not streamed by default
    streamed = BatchEvaluator(plan, stream_bytes=20_000_000)
    assert streamed._streams and all(len(s.chunks) > 1 for s in streamed._streams.values())
    expected = [save_seal(ct) for ct in whole.evaluate(cts, k.relin_keys)]
    assert [save_seal(ct) for ct in streamed.evaluate(cts, k.relin_keys)] == expected
