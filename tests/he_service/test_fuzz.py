"""Property-based fuzzing of every parser that touches client bytes, and of the HTTP API.

Each parser must return a value or raise ``ProtocolError``, nothing else. Each HTTP answer to a
bad request must be a 4xx with a JSON body ``{"error": {"code", "message"}}`` (never a 5xx, never
a stack trace), a context the service accepts must never crash the evaluator, and the app must
still serve a good request afterwards.

Hypothesis runs derandomized (the same examples on every run, no example database), so CI is
reproducible; the budgets below keep the module at about half a minute. Run with ``-s`` to see
how many cases each test ran (also recorded as the ``fuzz_cases`` property in JUnit XML).
"""

from __future__ import annotations

import copy
import dataclasses
import faulthandler
import hashlib
import json
import os
import resource
import signal
import struct
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import pytest
import tenseal.sealapi as seal
import zstandard
from flask import Flask
from hypothesis import HealthCheck, Phase, example, given, note, settings
from hypothesis import strategies as st

from clients import HEClient, KeySet, ModelSession
from he_service import create_app
from he_service.artifacts import load_artifact
from he_service.config import DEFAULT_MODELS_DIR, Config
from he_service.engine import forward_plain
from he_service.protocol import (
    CARD_VERSION,
    MEDIA_TYPE,
    CkksParams,
    KeyBundle,
    ModelCard,
    ProtocolError,
    decode_frames,
    decode_key_bundle,
    encode_frames,
    encode_key_bundle,
    load_seal,
    preprocess,
    save_seal,
    seal_context,
)

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=100,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)

# Shrinking megabyte inputs re-runs slow requests hundreds of times; notes describe the case.
NO_SHRINK = settings(FUZZ, phases=[Phase.explicit, Phase.reuse, Phase.generate])
CASES: dict[str, int] = {}
OUTCOMES: dict[str, Counter[str]] = defaultdict(Counter)  # what the cases got, per test
MAGIC = b"HEF1"
SEAL_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compression, -, size
SMALL = CkksParams(4096, (39, 30, 39), 30)  # parser-level fuzzing: cheap keys, same format
BREAST, MNIST = "breast-cancer-mlp", "mnist-cnn"
ERROR_STATUSES = range(400, 500)


def _count(name: str, **values: object) -> None:
    """Count one case and describe it for a failure report.

    Hypothesis prints no arguments here, and these would be megabytes anyway.
    """
    CASES[name] = CASES.get(name, 0) + 1
    for key, value in values.items():
        text = repr(value)
        if len(text) > 400:
            size = len(value) if isinstance(value, bytes | str | list | tuple | dict) else "?"
            text = f"{text[:400]}... (length {size})"
        note(f"{key} = {text}")


def _outcome(name: str, outcome: object) -> None:
    OUTCOMES[name][str(outcome)] += 1


def _report(record_property: Callable[[str, object], None], name: str) -> None:
    record_property("fuzz_cases", CASES.get(name, 0))
    outcomes = ", ".join(f"{k}: {n}" for k, n in sorted(OUTCOMES[name].items()))
    print(f"\n{name}: {CASES.get(name, 0)} cases" + (f" ({outcomes})" if outcomes else ""))


@pytest.fixture(scope="module", autouse=True)
def _summary() -> Iterator[None]:
    yield
    width = max((len(name) for name in CASES), default=10)
    lines = [
        f"{name:<{width}}  {count:>5}  "
        + ", ".join(f"{k}: {n}" for k, n in sorted(OUTCOMES[name].items()))
        for name, count in CASES.items()
    ]
    print(f"\nfuzz cases ({sum(CASES.values())} in all)\n" + "\n".join(lines))


# ----------------------------------------------------------------------------------- strategies

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from([0, -1, 1, 17, 60, 61, 4096, 8192, 8192.0, 2**63, "8192", "", True, False]),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
    ),
    max_leaves=10,
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Yield the paths of a JSON document (only the first elements of long lists)."""
    if prefix:
        yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc[:3]):
            yield from _paths(value, (*prefix, index))


def _at(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


@st.composite
def mutated_json(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with one to three fields replaced, deleted or wrapped."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(doc))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, key = _at(doc, path[:-1]), path[-1]
        action = draw(st.sampled_from(["replace", "delete", "wrap", "add"]))
        if action == "replace":
            parent[key] = draw(JSON_VALUES)
        elif action == "delete":
            del parent[key]
        elif action == "wrap":
            parent[key] = [parent[key]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=6))] = draw(JSON_VALUES)
    return doc


@st.composite
def mutated_bytes(draw: st.DrawFn, base: bytes, hot: int = 256) -> bytes:
    """``base`` with a few bytes set (mostly in its first ``hot`` bytes), cut or extended."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        region = draw(st.sampled_from([min(hot, len(data)), len(data)]))
        data[draw(st.integers(0, region - 1))] = draw(st.integers(0, 255))
    end = draw(st.sampled_from(["keep", "truncate", "append"]))
    if end == "truncate":
        del data[draw(st.integers(0, len(data))) :]
    elif end == "append":
        data += draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


def _inflate(data: bytes) -> bytes:
    """Rewrite a SEAL object uncompressed (if it is not), so mutations reach SEAL's parser."""
    magic, size, major, minor, compression, reserved, _ = SEAL_HEADER.unpack_from(data)
    if compression == 0:  # fresh ciphertexts from the SDK (save_seeded)
        return data
    assert compression == 2
    payload = zstandard.ZstdDecompressor().decompress(data[size:], max_output_size=64 << 20)
    header = SEAL_HEADER.pack(magic, size, major, minor, 0, reserved, size + len(payload))
    return header + payload


@st.composite
def mutated_seal(draw: st.DrawFn, bases: list[bytes]) -> bytes:
    """A SEAL object (zstd or raw) with flipped bytes, optionally with a consistent size field."""
    data = bytearray(draw(mutated_bytes(draw(st.sampled_from(bases)), hot=160)))
    if len(data) >= SEAL_HEADER.size and draw(st.booleans()):
        struct.pack_into("<Q", data, 8, len(data))  # so SEAL, not our size check, meets the bytes
    return bytes(data)


# ---------------------------------------------------------------------------------- fixtures


def _app_config(store_dir: Path) -> dict[str, object]:
    overrides: dict[str, object] = {"key_store_max_bytes": 1 << 30}
    if "key_store_dir" in {field.name for field in dataclasses.fields(Config)}:
        overrides["key_store_dir"] = store_dir  # never the user's cache directory
    return overrides


@dataclasses.dataclass(repr=False)  # a repr would print megabytes of keys in reports
class World:
    app: Flask
    client: HEClient
    sessions: dict[tuple[str, str], ModelSession]
    inputs: dict[tuple[str, str], list[bytes]]
    sample: np.ndarray
    expected: np.ndarray
    small_keys: KeySet

    def own_context(self, model: str, plan: str) -> str:
        """The stored context for this model and plan, else the nearest one."""
        plan = plan if plan in ("latency", "batch") else "latency"
        session = self.sessions.get((model, plan)) or self.sessions[(BREAST, plan)]
        return session.context_id


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    from models.datasets import load_breast_cancer_split

    app = create_app(_app_config(tmp_path_factory.mktemp("contexts")))
    client = HEClient("http://testserver", transport=httpx.WSGITransport(app=app))
    sessions = {
        (BREAST, "latency"): client.model(BREAST),
        (BREAST, "batch"): client.model(BREAST, plan="batch"),
        (MNIST, "latency"): client.model(MNIST),
    }
    raw = np.asarray(load_breast_cancer_split(0).x_test[:2], dtype=np.float64)
    artifact = load_artifact(DEFAULT_MODELS_DIR / BREAST)
    expected = forward_plain(artifact, preprocess(raw[0], artifact.preprocessing, (30,)))
    batch = sessions[(BREAST, "batch")]
    inputs = {
        (BREAST, "latency"): sessions[(BREAST, "latency")].encrypt(raw[0]),
        (MNIST, "latency"): sessions[(MNIST, "latency")].encrypt(np.zeros((1, 28, 28))),
        (BREAST, "batch"): [batch.keys.encrypt(np.zeros(batch.spec.ckks.slot_count))] * 30,
    }
    with client:
        yield World(app, client, sessions, inputs, raw[0], expected, KeySet.generate(SMALL, (1, 3)))


def _assert_error(response: Any, method: str = "GET") -> None:
    """A 4xx answer whose body (not for HEAD) is ``{"error": {"code", "message"}}``."""
    text = response.get_data(as_text=True)
    assert response.status_code in ERROR_STATUSES, (response.status_code, text[:300])
    assert "Traceback" not in text
    if method == "HEAD":
        assert not text
        return
    assert response.mimetype == "application/json", (response.status_code, text[:300])
    error = json.loads(text)["error"]
    assert isinstance(error["code"], str) and isinstance(error["message"], str), text[:300]


def _assert_still_serves(world: World) -> None:
    """After the fuzzing: health is fine and a real encrypted prediction is still right."""
    assert world.app.test_client().get("/v1/health").status_code == 200
    session = world.sessions[(BREAST, "latency")]
    logits = session.predict(world.sample)
    # Released outputs are within two steps of the plan's published output precision.
    np.testing.assert_allclose(logits, world.expected, atol=2 * session.spec.output_precision)
    assert np.argmax(logits) == np.argmax(world.expected)


def _in_child(action: Callable[[], int]) -> str:
    """Run ``action`` in a forked child; describe how it ended ("exit 0", "signal 11", ...).

    A segmentation fault in SEAL would kill the whole test run; in a child it is a finding.
    Without fork (Windows) the action runs here.
    """
    if not hasattr(os, "fork"):  # pragma: no cover
        return f"exit {action()}"
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        faulthandler.disable()  # the parent reports the crash; no dump, no core file
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.alarm(120)  # a lock held by another thread at fork time: fail, do not hang
        code = 98
        try:
            code = action()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit {os.WEXITSTATUS(status)}"


def _predict_status(app: Flask, model: str, plan: str, context_id: str, body: bytes) -> int:
    response = app.test_client().post(
        f"/v1/models/{model}/predict?plan={plan}",
        data=body,
        headers={"X-Context-Id": context_id},
    )
    return response.status_code // 100  # 2, 4 or 5 as the child's exit code


# ------------------------------------------------------------------------------ decode_frames


COUNTS = st.one_of(
    st.sampled_from([0, 1, 2, 3, 255, 2**16, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1)
)
LENGTHS = st.one_of(
    st.sampled_from([0, 1, 7, 8, 9, 2**31, 2**32, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1)
)


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    """A valid framed message with its count or length fields rewritten, cut or extended."""
    items = draw(st.lists(st.binary(max_size=40), max_size=6))
    data = bytearray(encode_frames(items))
    offsets, offset = [], len(MAGIC) + 4
    for item in items:
        offsets.append(offset)
        offset += 8 + len(item)
    for op in draw(st.lists(st.sampled_from(["count", "length", "byte"]), max_size=3)):
        if op == "count":
            struct.pack_into("<I", data, len(MAGIC), draw(COUNTS))
        elif op == "length" and offsets:
            struct.pack_into("<Q", data, draw(st.sampled_from(offsets)), draw(LENGTHS))
        elif op == "byte":
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    end = draw(st.sampled_from(["keep", "truncate", "append"]))
    if end == "truncate":
        del data[draw(st.integers(0, len(data))) :]
    elif end == "append":
        data += draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


def _check_frames(data: bytes, max_items: int) -> str:
    try:
        items = decode_frames(data, max_items=max_items)
    except ProtocolError:
        return "ProtocolError"
    assert 1 <= len(items) <= max_items
    assert encode_frames(items) == data  # nothing skipped, nothing invented
    return "decoded"


def test_decode_frames_arbitrary_bytes(record_property: Any) -> None:
    name = "decode_frames/arbitrary"

    @settings(FUZZ, max_examples=300)
    @given(
        data=st.one_of(st.binary(max_size=200), st.binary(max_size=200).map(MAGIC.__add__)),
        max_items=st.integers(0, 2**33),
    )
    @example(data=MAGIC + struct.pack("<I", 2**32 - 1), max_items=2**33)
    @example(data=MAGIC + struct.pack("<IQ", 1, 2**64 - 1), max_items=1)
    def run(data: bytes, max_items: int) -> None:
        _count(name, data=data, max_items=max_items)
        _outcome(name, _check_frames(data, max_items))

    run()
    _report(record_property, name)


def test_decode_frames_mutated_valid_frames(record_property: Any) -> None:
    name = "decode_frames/mutated"

    @settings(FUZZ, max_examples=300)
    @given(data=mutated_frames(), max_items=st.sampled_from([1, 2, 4, 8, 2**20, 2**32]))
    def run(data: bytes, max_items: int) -> None:
        _count(name, data=data, max_items=max_items)
        _outcome(name, _check_frames(data, max_items))

    run()
    _report(record_property, name)


# --------------------------------------------------------------------------- decode_key_bundle


def _bundle_parts(keys: KeySet, *, secret: bool = False) -> tuple[dict[str, Any], list[bytes]]:
    frames = decode_frames(keys.public_context, max_items=8)
    header = json.loads(frames[0])
    sections = frames[1:]
    if secret:
        header["sections"] = [*header["sections"], "secret_key"]
        sections = [*sections, save_seal(keys.secret_key)]
    return header, sections


# Valid header text with one value replaced by a literal no JSON encoder would write.
PATHOLOGICAL = st.one_of(
    st.integers(1, 20_000).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 20_000).map(lambda n: '{"a":' * n + "0" + "}" * n),
    st.integers(1, 10_000).map(lambda n: "1" * n),
    st.sampled_from(["1e999999", "-1e999999", "NaN", "Infinity", "-0", "8192.0", "true", "1.5"]),
)


@st.composite
def pathological_header(draw: st.DrawFn, header: dict[str, Any]) -> str:
    """The header's JSON text with one field's value replaced by a PATHOLOGICAL literal."""
    field = draw(st.sampled_from(["version", "galois_steps", "sections", "ckks"]))
    placeholder = "\u0000PLACEHOLDER\u0000"
    text = json.dumps({**header, field: placeholder})
    return text.replace(json.dumps(placeholder), draw(PATHOLOGICAL))


@st.composite
def bundle_bytes(draw: st.DrawFn, keys: KeySet) -> bytes:
    """Key bundles: junk, mutated headers, pathological JSON, shuffled sections, flipped bytes."""
    header, sections = _bundle_parts(keys, secret=draw(st.booleans()))
    kind = draw(st.sampled_from(["header", "pathological", "sections", "bytes", "junk"]))
    if kind == "junk":
        junk = draw(st.binary(max_size=300))
        return draw(st.sampled_from([junk, MAGIC + junk, encode_frames([junk, junk])]))
    if kind == "bytes":
        return draw(mutated_bytes(encode_frames([json.dumps(header).encode(), *sections])))
    text = json.dumps(header)
    if kind == "header":
        text = json.dumps(draw(mutated_json(header)))
    elif kind == "pathological":
        text = draw(pathological_header(header))
    elif kind == "sections":
        sections = draw(st.lists(st.sampled_from(sections), max_size=4))
    encoded = draw(
        st.sampled_from([text.encode(), text.encode("utf-16"), b"\xef\xbb\xbf" + text.encode()])
    )
    return encode_frames([encoded, *sections])


def _check_bundle(data: bytes) -> KeyBundle | None:
    try:
        bundle = decode_key_bundle(data)
    except ProtocolError:
        return None
    params = bundle.params
    assert not bundle.has_secret_key and "relin_keys" in bundle.sections
    assert type(params.poly_modulus_degree) is int, params  # not 8192.0: SEAL wants an int
    assert type(params.scale_bits) is int and all(type(b) is int for b in params.coeff_modulus_bits)
    assert all(type(s) is int and 0 < s < params.slot_count for s in bundle.galois_steps), bundle
    return bundle


def _regression_header(**changes: str) -> bytes:
    """A one-section public bundle whose header has these fields as raw JSON text."""
    header: dict[str, Any] = {"format": "he-inference-keys", "version": 1}
    header |= {"sections": ["relin_keys"], "ckks": SMALL.to_json(), "galois_steps": [1]}
    text = json.dumps({k: v for k, v in header.items() if k not in changes})[:-1]
    for field, raw in changes.items():
        text += f', "{field}": {raw}'
    return encode_frames([(text + "}").encode(), b"x"])


def _ckks_text(**changes: object) -> str:
    return json.dumps({**SMALL.to_json(), **changes})


def test_decode_key_bundle(world: World, record_property: Any) -> None:
    name = "decode_key_bundle"

    @settings(FUZZ, max_examples=300)
    @given(data=bundle_bytes(world.small_keys))
    # Found by this test: each of these raised something else than ProtocolError (a 500).
    @example(data=_regression_header(galois_steps="[" * 5000 + "]" * 5000))  # RecursionError
    @example(data=_regression_header(galois_steps="[" + "1" * 5000 + "]"))  # int digits limit
    @example(data=_regression_header(sections='[["relin_keys"]]'))  # unhashable section
    @example(data=_regression_header(ckks=_ckks_text(poly_modulus_degree=[4096])))  # unhashable
    @example(data=_regression_header(ckks=_ckks_text(poly_modulus_degree=4096.0)))  # a float
    def run(data: bytes) -> None:
        _count(name, data=data)
        _outcome(name, "ProtocolError" if _check_bundle(data) is None else "decoded")

    run()
    _report(record_property, name)


# ---------------------------------------------------------------------------------- load_seal


@pytest.fixture(scope="module")
def seal_objects(world: World) -> dict[str, tuple[type, list[bytes], seal.SEALContext]]:
    """Real seeded objects from ``clients.KeySet``, zstd as sent and inflated (raw)."""
    session = world.sessions[(BREAST, "latency")]
    keys = KeySet.generate(session.spec.ckks, (1, 5))
    sections = decode_key_bundle(keys.public_context).sections
    context = seal_context(session.spec.ckks)
    ciphertext = keys.encrypt(np.linspace(-1, 1, session.spec.ckks.slot_count))
    found = {
        "ciphertext": (seal.Ciphertext, ciphertext),
        "relin_keys": (seal.RelinKeys, sections["relin_keys"]),
        "galois_keys": (seal.GaloisKeys, sections["galois_keys"]),
    }
    return {kind: (cls, [data, _inflate(data)], context) for kind, (cls, data) in found.items()}


@pytest.mark.parametrize(
    ("kind", "examples"), [("ciphertext", 300), ("relin_keys", 120), ("galois_keys", 80)]
)
def test_load_seal_mutated_objects(
    seal_objects: dict[str, tuple[type, list[bytes], seal.SEALContext]],
    kind: str,
    examples: int,
    record_property: Any,
) -> None:
    name = f"load_seal/{kind}"
    cls, bases, context = seal_objects[kind]

    @settings(NO_SHRINK, max_examples=examples)
    @given(data=mutated_seal(bases))
    def run(data: bytes) -> None:
        _count(name, data=data)
        try:
            loaded = load_seal(cls, data, context, what=kind)
        except ProtocolError:
            _outcome(name, "ProtocolError")
            return
        assert isinstance(loaded, cls)
        _outcome(name, "loaded")

    run()
    _report(record_property, name)


# ------------------------------------------------------------------ ModelCard / CkksParams JSON


CARD_KEYS = ["card_version", "name", "description", "input", "output", "plans", "details"]
CKKS_KEYS = ["poly_modulus_degree", "coeff_modulus_bits", "scale_bits", "scheme", "galois_steps"]


def _cards(world: World) -> list[dict[str, Any]]:
    test = world.app.test_client()
    return [test.get(f"/v1/models/{name}").get_json() for name in (BREAST, MNIST)]


def test_model_card_from_json(world: World, record_property: Any) -> None:
    name = "ModelCard.from_json"
    cards = _cards(world)
    arbitrary = st.dictionaries(
        st.one_of(st.sampled_from(CARD_KEYS), st.text(max_size=8)), JSON_VALUES, max_size=8
    ).map(
        lambda doc: (
            {"card_version": CARD_VERSION, **doc} if doc.get("card_version") is None else doc
        )
    )
    inf_steps = copy.deepcopy(cards[0])
    inf_steps["plans"]["latency"]["ckks"]["galois_steps"] = [float("inf")]

    @settings(FUZZ, max_examples=200)
    @given(doc=st.one_of(arbitrary, st.sampled_from(cards).flatmap(mutated_json)))
    @example(doc=inf_steps)  # int(inf): OverflowError, not ProtocolError
    def run(doc: dict[str, Any]) -> None:
        _count(name, doc=doc)
        try:
            card = ModelCard.from_json(doc)
        except ProtocolError:
            _outcome(name, "ProtocolError")
            return
        assert isinstance(card, ModelCard)
        _outcome(name, "parsed")

    run()
    _report(record_property, name)


def test_ckks_params_from_json(world: World, record_property: Any) -> None:
    name = "CkksParams.from_json"
    specs = [plan["ckks"] for card in _cards(world) for plan in card["plans"].values()]
    arbitrary = st.dictionaries(
        st.one_of(st.sampled_from(CKKS_KEYS), st.text(max_size=8)), JSON_VALUES, max_size=6
    )

    @settings(FUZZ, max_examples=200)
    @given(spec=st.one_of(arbitrary, st.sampled_from(specs).flatmap(mutated_json)))
    @example(spec={**specs[0], "poly_modulus_degree": [8192]})  # TypeError: unhashable
    @example(spec={**specs[0], "poly_modulus_degree": 8192.0})  # a float SEAL refuses
    def run(spec: dict[str, Any]) -> None:
        _count(name, spec=spec)
        try:
            params = CkksParams.from_json(spec)
        except ProtocolError:
            _outcome(name, "ProtocolError")
            return
        _outcome(name, "parsed")
        assert type(params.poly_modulus_degree) is int, params
        assert type(params.scale_bits) is int, params
        assert all(type(bits) is int for bits in params.coeff_modulus_bits), params

    run()
    _report(record_property, name)


# ------------------------------------------------------------------------------------- HTTP

CONTENT_TYPES = st.one_of(
    st.sampled_from(
        [
            None,
            "application/octet-stream",
            "application/vnd.he-inference.frames",
            "application/json",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "text/plain; charset=utf-8",
            "",
        ]
    ),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
)
# Mostly the true Content-Length, so that the bodies get parsed; otherwise a wrong one.
LENGTH_OVERRIDES = st.one_of(
    st.none(), st.sampled_from(["0", "1", "-1", "abc", "shorter", "longer", "huge"])
)
HEADER_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=80)


def _environ(body: bytes, length: str | None) -> dict[str, str]:
    if length is None:
        return {}
    value = {
        "shorter": str(max(0, len(body) - 1)),
        "longer": str(len(body) + 10),
        "huge": str(10**20),
    }.get(length, length)
    return {"CONTENT_LENGTH": value}


def _headers(content_type: str | None, extra: dict[str, str]) -> dict[str, str]:
    headers = dict(extra)
    if content_type is not None:
        headers["Content-Type"] = content_type
    return headers


@st.composite
def context_bodies(
    draw: st.DrawFn, bases: list[tuple[str, bytes]], secret: bytes
) -> tuple[str, str, bytes]:
    """(kind, plan the keys were made for, body) for POST /v1/contexts."""
    plan, good = draw(st.sampled_from(bases))
    frames = decode_frames(good, max_items=8)
    kinds = ["header", "pathological", "swap", "flip", "payload", "secret", "random", "framed"]
    kinds += ["payload", "empty"]
    kind = draw(st.sampled_from(kinds))
    if kind == "header":
        header = draw(mutated_json(json.loads(frames[0])))
        return kind, plan, encode_frames([json.dumps(header).encode(), *frames[1:]])
    if kind == "pathological":
        text = draw(pathological_header(json.loads(frames[0])))
        return kind, plan, encode_frames([text.encode(), *frames[1:]])
    if kind == "swap":  # section payloads exchanged or duplicated behind a valid header
        slot = st.sampled_from(frames[1:])
        sections = [draw(slot) for _ in frames[1:]]
        return kind, plan, encode_frames([frames[0], *sections])
    if kind == "flip":
        return kind, plan, draw(mutated_bytes(good, hot=1024))
    if kind == "payload":  # key data changed, framing and SEAL headers intact: often accepted
        index = draw(st.integers(1, len(frames) - 1))
        data = bytearray(_inflate(frames[index]))
        for _ in range(draw(st.integers(1, 3))):  # low bits: coefficients stay below q
            data[draw(st.integers(SEAL_HEADER.size, len(data) - 1))] ^= 1 << draw(st.integers(0, 3))
        sections = [*frames[1:index], bytes(data), *frames[index + 1 :]]
        return kind, plan, encode_frames([frames[0], *sections])
    if kind == "secret":
        header = json.loads(frames[0])
        header["sections"] = [*header["sections"], "secret_key"]
        return kind, plan, encode_frames([json.dumps(header).encode(), *frames[1:], secret])
    if kind == "random":
        return kind, plan, draw(st.binary(max_size=2000))
    if kind == "framed":
        return kind, plan, encode_frames(draw(st.lists(st.binary(max_size=300), max_size=4)))
    return kind, plan, b""


def _relin_from_galois(world: World) -> bytes:
    """Regression: a latency context whose relin_keys section holds Galois keys."""
    bundle = decode_key_bundle(world.sessions[(BREAST, "latency")].public_context())
    sections = {**bundle.sections, "relin_keys": bundle.sections["galois_keys"]}
    return encode_key_bundle(KeyBundle(bundle.params, bundle.galois_steps, sections))


def test_http_post_contexts(world: World, record_property: Any) -> None:
    name = "HTTP POST /v1/contexts"
    batch = world.sessions[(BREAST, "batch")]
    bases = [
        ("batch", batch.public_context()),
        # batch parameters with one Galois key too: small, and swaps can reach the evaluator
        ("batch", KeySet.generate(batch.spec.ckks, (1,)).public_context),
        ("latency", world.sessions[(BREAST, "latency")].public_context()),
    ]
    swapped = ("swap", "latency", _relin_from_galois(world))

    @settings(NO_SHRINK, max_examples=90)
    @given(
        case=context_bodies(bases, save_seal(world.small_keys.secret_key)),
        content_type=CONTENT_TYPES,
        length=LENGTH_OVERRIDES,
        context_header=st.one_of(st.none(), HEADER_TEXT),
    )
    @example(case=swapped, content_type=None, length=None, context_header=None)
    def run(
        case: tuple[str, str, bytes],
        content_type: str | None,
        length: str | None,
        context_header: str | None,
    ) -> None:
        _count(
            name, case=case, content_type=content_type, length=length, context_header=context_header
        )
        kind, plan, body = case
        extra = {} if context_header is None else {"X-Context-Id": context_header}
        response = world.app.test_client().post(
            "/v1/contexts",
            data=body,
            headers=_headers(content_type, extra),
            environ_overrides=_environ(body, length),
        )
        _outcome(name, f"{kind} {response.status_code}")
        if response.status_code not in (200, 201):
            _assert_error(response)
            return
        assert kind in ("header", "pathological", "swap", "flip", "payload"), kind
        context_id = response.get_json()["context_id"]
        if length in (None, "longer"):
            assert context_id == hashlib.sha256(body).hexdigest()
        # The store accepted these keys: a prediction with them must not crash the evaluator.
        inputs = encode_frames(world.inputs[(BREAST, plan)])
        ended = _in_child(lambda: _predict_status(world.app, BREAST, plan, context_id, inputs))
        _outcome(name, f"then predict: {ended}")
        assert ended in ("exit 2", "exit 4"), (
            f"a {plan} prediction with an accepted {kind!r} context ended with {ended} "
            "(exit 5 = a 5xx answer, signal 11 = segmentation fault)"
        )

    run()
    _report(record_property, name)
    _assert_still_serves(world)


VALID_PREDICTS = [(BREAST, "latency"), (BREAST, "batch"), (MNIST, "latency")]


@st.composite
def predict_requests(draw: st.DrawFn, world: World) -> dict[str, Any]:
    """A valid predict request with one part broken (or none, or only its headers)."""
    broken = draw(
        st.sampled_from(["none", "body", "body", "body", "context", "model", "plan", "headers"])
    )
    model, plan = draw(st.sampled_from(VALID_PREDICTS))
    inputs = world.inputs[(model, plan)]
    query: str | None = plan if plan == "batch" else draw(st.sampled_from(["latency", None]))
    headers = {"X-Context-Id": world.own_context(model, plan)}
    body_kind, body = "valid", encode_frames(inputs)
    content_type: str | None = MEDIA_TYPE
    length = None
    if broken == "model":
        model = draw(st.one_of(st.text(max_size=20), st.sampled_from(["MNIST-CNN", "mnist_cnn"])))
    elif broken == "plan":
        query = draw(st.text(max_size=12).filter(lambda q: q not in ("latency", "batch")))
    elif broken == "context":
        choice = draw(st.sampled_from(["other", "unknown", "missing", "junk"]))
        if choice == "other":  # a stored context made for other parameters or steps
            other = {(BREAST, "latency"): "batch", (BREAST, "batch"): "latency"}
            headers["X-Context-Id"] = world.own_context(BREAST, other.get((model, plan), "latency"))
        elif choice == "unknown":
            headers["X-Context-Id"] = draw(st.text("0123456789abcdef", min_size=64, max_size=64))
        elif choice == "missing":
            del headers["X-Context-Id"]
        else:
            headers["X-Context-Id"] = draw(HEADER_TEXT)
    elif broken == "headers":
        content_type = draw(CONTENT_TYPES)
        length = draw(st.sampled_from([None, "shorter", "longer", "0", "1", "-1", "abc", "huge"]))
    elif broken == "body":
        body_kind = draw(st.sampled_from(["mutated", "count", "huge", "random", "framed", "empty"]))
        if body_kind == "mutated":
            index = draw(st.integers(0, len(inputs) - 1))
            bad = draw(mutated_seal([inputs[index], _inflate(inputs[index])]))
            body = encode_frames([*inputs[:index], bad, *inputs[index + 1 :]])
        elif body_kind == "count":  # valid ciphertexts, the wrong number of them
            n = len(inputs)  # one sample per n; a latency request holds at most 16 samples
            counts = [n - 1, n + 1, 2 * n + 1] if n > 1 else [17, 100]
            body = encode_frames([inputs[0]] * draw(st.sampled_from(counts)))
        elif body_kind == "huge":  # a count field far beyond the body
            body = MAGIC + struct.pack("<I", draw(COUNTS)) + draw(st.binary(max_size=64))
        elif body_kind == "random":
            body = draw(st.binary(max_size=3000))
        elif body_kind == "framed":
            body = encode_frames(draw(st.lists(st.binary(max_size=500), max_size=5)))
        else:
            body = b""
    return {
        "broken": broken,
        "model": model,
        "plan": plan,
        "query": query,
        "body_kind": body_kind,
        "body": body,
        "headers": _headers(content_type, headers),
        "length": length,
    }


def test_http_predict(world: World, record_property: Any) -> None:
    name = "HTTP POST /v1/models/<name>/predict"

    @settings(NO_SHRINK, max_examples=200)
    @given(request=predict_requests(world))
    def run(request: dict[str, Any]) -> None:
        _count(name, request=request)
        query = "" if request["query"] is None else f"?plan={quote(request['query'], safe='')}"
        path = f"/v1/models/{quote(request['model'], safe='')}/predict{query}"
        response = world.app.test_client().post(
            path,
            data=request["body"],
            headers=request["headers"],
            environ_overrides=_environ(request["body"], request["length"]),
        )
        _outcome(name, f"{request['broken']} {response.status_code}")
        if request["broken"] == "none":  # a valid request: it must succeed, and decrypt right
            assert response.status_code == 200, response.get_data(as_text=True)[:300]
            session = world.sessions[(request["model"], request["plan"])]
            outputs = decode_frames(response.data, max_items=64)
            assert len(outputs) == session.spec.output_decoding.ciphertexts_per_unit
            if (request["model"], request["plan"]) == (BREAST, "latency"):
                logits = session.decrypt(outputs[0])
                assert np.argmax(logits) == np.argmax(world.expected)
            return
        if response.status_code == 200:
            assert request["broken"] in ("body", "headers"), request["broken"]
            assert request["body_kind"] in ("valid", "mutated"), request["body_kind"]
            assert decode_frames(response.data, max_items=64)
            return
        _assert_error(response)

    run()
    _report(record_property, name)
    _assert_still_serves(world)


def test_http_predict_non_ntt_ciphertext_is_a_400(world: World) -> None:
    """Regression found by the fuzzer: SEAL loads a CKKS ciphertext whose NTT flag is cleared."""
    data = bytearray(_inflate(world.inputs[(BREAST, "latency")][0]))
    data[SEAL_HEADER.size + 32] = 0  # after the 32-byte parms_id: is_ntt_form
    response = world.app.test_client().post(
        f"/v1/models/{BREAST}/predict",
        data=encode_frames([bytes(data)]),
        headers={"X-Context-Id": world.own_context(BREAST, "latency")},
    )
    _assert_error(response)


@st.composite
def upload_parts(draw: st.DrawFn, world: World) -> dict[str, Any]:
    """A valid request sent as numbered parts, with one part broken (or none)."""
    model, plan = draw(st.sampled_from(VALID_PREDICTS))
    inputs = world.inputs[(model, plan)]
    size = draw(st.integers(1, max(1, len(inputs) // 2)))
    parts = [
        [index, encode_frames(inputs[first : first + size])]
        for index, first in enumerate(range(0, len(inputs), size))
    ]
    broken = draw(
        st.sampled_from(["none", "mutated", "count", "random", "framed", "huge", "empty", "index"])
    )
    victim = draw(st.integers(0, len(parts) - 1))
    if broken == "mutated":
        index = draw(st.integers(0, len(inputs) - 1))
        bad = draw(mutated_seal([inputs[index], _inflate(inputs[index])]))
        parts[victim][1] = encode_frames([bad])
    elif broken == "count":  # valid ciphertexts, another number of them in this part
        counts = [count for count in (0, 1, size - 1, size + 1) if count != size]
        parts[victim][1] = encode_frames([inputs[0]] * draw(st.sampled_from(counts)))
    elif broken == "random":
        parts[victim][1] = draw(st.binary(max_size=3000))
    elif broken == "framed":
        parts[victim][1] = encode_frames(draw(st.lists(st.binary(max_size=500), max_size=5)))
    elif broken == "huge":
        parts[victim][1] = MAGIC + struct.pack("<I", draw(COUNTS)) + draw(st.binary(max_size=64))
    elif broken == "empty":
        parts[victim][1] = b""
    elif broken == "index":
        parts[victim][0] = draw(st.sampled_from([len(parts) + 1, 10**6, 2**64]))
    return {"model": model, "plan": plan, "broken": broken, "parts": parts}


def test_http_upload_parts(world: World, record_property: Any) -> None:
    name = "HTTP uploads: parts and predict"

    @settings(NO_SHRINK, max_examples=100)
    @given(request=upload_parts(world))
    def run(request: dict[str, Any]) -> None:
        _count(name, request=request)
        test = world.app.test_client()
        model, plan = request["model"], request["plan"]
        created = test.post(
            f"/v1/models/{model}/uploads?plan={plan}",
            headers={"X-Context-Id": world.own_context(model, plan)},
        )
        assert created.status_code == 201, created.get_data(as_text=True)[:300]
        upload_id = created.get_json()["upload_id"]
        statuses = []
        for index, body in request["parts"]:
            answer = test.put(f"/v1/uploads/{upload_id}/parts/{index}", data=body)
            statuses.append(answer.status_code)
            if answer.status_code != 200:
                _assert_error(answer)
        response = test.post(f"/v1/uploads/{upload_id}/predict")
        _outcome(name, f"{request['broken']} {response.status_code}")
        if request["broken"] == "none":
            assert statuses == [200] * len(statuses)
            assert response.status_code == 200, response.get_data(as_text=True)[:300]
            session = world.sessions[(model, plan)]
            outputs = decode_frames(response.data, max_items=64)
            assert len(outputs) == session.spec.output_decoding.ciphertexts_per_unit
        elif response.status_code == 200:
            # SEAL may accept a mutated ciphertext; a count may be whole samples after all.
            assert request["broken"] in ("mutated", "count"), request["broken"]
            assert decode_frames(response.data, max_items=64)
        else:
            _assert_error(response)
        # Whatever happened, the prediction consumed the upload.
        assert test.delete(f"/v1/uploads/{upload_id}").status_code == 404

    run()
    _report(record_property, name)
    _assert_still_serves(world)


ID_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=80)
HEX_LIKE = st.text("0123456789abcdefABCDEF", min_size=62, max_size=66)


def test_http_context_ids(world: World, record_property: Any) -> None:
    name = "HTTP HEAD/DELETE /v1/contexts/<id>"

    @settings(FUZZ, max_examples=150)
    @given(
        method=st.sampled_from(["HEAD", "DELETE"]),
        context_id=st.one_of(ID_TEXT, HEX_LIKE, HEX_LIKE.map(lambda s: s + "\n")),
    )
    @example(method="HEAD", context_id="a" * 64 + "\n")  # `$` in the id regex matches before \n
    def run(method: str, context_id: str) -> None:
        _count(name, method=method, context_id=context_id)
        response = world.app.test_client().open(
            f"/v1/contexts/{quote(context_id, safe='')}", method=method
        )
        _outcome(name, response.status_code)
        if "/" in context_id or not context_id:  # another route, none, or a redirect
            assert response.status_code in (301, 308) or response.status_code in ERROR_STATUSES
            return
        _assert_error(response, method)
        if len(context_id) == 64 and set(context_id) <= set("0123456789abcdef"):
            assert response.status_code == 404  # well formed, never uploaded
        else:
            assert response.status_code == 400, (context_id, response.status_code)

    run()
    _report(record_property, name)
    _assert_still_serves(world)


def test_http_model_names(world: World, record_property: Any) -> None:
    name = "HTTP GET /v1/models/<name>"
    served = set(world.client.health()["models"])

    @settings(FUZZ, max_examples=100)
    @given(
        model=ID_TEXT.filter(lambda s: s and s not in served),
        method=st.sampled_from(["GET", "HEAD"]),
    )
    @example(model="a" * 10_000, method="GET")
    def run(model: str, method: str) -> None:
        _count(name, model=model, method=method)
        response = world.app.test_client().open(
            f"/v1/models/{quote(model, safe='')}", method=method
        )
        _outcome(name, response.status_code)
        if "/" in model:  # another route, or a redirect to a canonical path
            assert response.status_code in (301, 308) or response.status_code in ERROR_STATUSES
            return
        _assert_error(response, method)
        assert response.status_code == 404

    run()
    _report(record_property, name)
    _assert_still_serves(world)


def test_http_wrong_methods(world: World, record_property: Any) -> None:
    name = "HTTP wrong methods"
    paths = [
        "/v1/health",
        "/v1/models",
        f"/v1/models/{BREAST}",
        "/v1/contexts",
        f"/v1/contexts/{'0' * 64}",
        f"/v1/models/{BREAST}/predict",
        f"/v1/models/{BREAST}/uploads",
        f"/v1/uploads/{'0' * 32}",
        f"/v1/uploads/{'0' * 32}/parts/0",
        f"/v1/uploads/{'0' * 32}/predict",
        "/v1/openapi.json",
    ]
    allowed = {
        "/v1/contexts": {"POST"},
        f"/v1/contexts/{'0' * 64}": {"HEAD", "DELETE"},
        f"/v1/models/{BREAST}/predict": {"POST"},
        f"/v1/models/{BREAST}/uploads": {"POST"},
        f"/v1/uploads/{'0' * 32}": {"DELETE"},
        f"/v1/uploads/{'0' * 32}/parts/0": {"PUT"},
        f"/v1/uploads/{'0' * 32}/predict": {"POST"},
    }

    @settings(FUZZ, max_examples=60)
    @given(
        path=st.sampled_from(paths),
        method=st.sampled_from(["GET", "PUT", "PATCH", "DELETE", "POST", "TRACE"]),
        body=st.binary(max_size=64),
    )
    def run(path: str, method: str, body: bytes) -> None:
        _count(name, path=path, method=method, body=body)
        if method in allowed.get(path, {"GET", "HEAD"}):
            return
        response = world.app.test_client().open(path, method=method, data=body)
        _outcome(name, response.status_code)
        _assert_error(response, method)
        assert response.status_code == 405
        assert response.headers.get("Allow"), "RFC 9110: a 405 lists the allowed methods"

    run()
    _report(record_property, name)
    _assert_still_serves(world)
