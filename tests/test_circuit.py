from __future__ import annotations

import time

from upstream_ops.circuit import Circuit
from upstream_ops.defaults import CIRCUIT_PROBE_MAX_S, CIRCUIT_PROBE_MIN_S


def test_opens_backs_off_with_a_ceiling_and_closes() -> None:
    circuit = Circuit(batch_size=256)
    assert not circuit.is_open and circuit.due(time.monotonic())
    assert circuit.failed()  # the first failure is worth a warning
    assert circuit.is_open and not circuit.due(time.monotonic())
    delays = []
    for _ in range(10):
        before = time.monotonic()
        assert not circuit.failed()  # ... the next ones within a minute are not
        delays.append(circuit.probe_at - before)
    assert delays[0] >= CIRCUIT_PROBE_MIN_S * 2 * 0.75
    assert max(delays) <= CIRCUIT_PROBE_MAX_S * 1.25
    assert circuit.succeeded()
    assert not circuit.is_open and circuit.due(time.monotonic())
    assert not circuit.succeeded()  # it was closed already


def test_probes_shrink_to_one_record_and_grow_back() -> None:
    circuit = Circuit(batch_size=256)
    sizes = []
    for _ in range(10):
        circuit.failed(shrink=True, back_off=False)
        sizes.append(circuit.probe_size)
    assert sizes == [128, 64, 32, 16, 8, 4, 2, 1, 1, 1]
    # halving does not grow the delay, so isolating a bad record stays quick
    assert circuit.probe_at - time.monotonic() <= CIRCUIT_PROBE_MIN_S * 1.25
    grown = []
    for _ in range(9):
        circuit.succeeded()
        grown.append(circuit.probe_size)
    assert grown == [2, 4, 8, 16, 32, 64, 128, 256, 256]
