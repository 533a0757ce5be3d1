"""One request's time with cold caches, in-process: what the memory a request touches costs.

    python -m bench.cold asgi.bare asgi.ours [--requests 1500] [--evict-mib 32]

The in-process loop of ``make bench`` runs request after request with warm caches. A server that
waits for its client between requests does not, and on a VM another guest may run on the core
meanwhile: under uvicorn our happy path cost 0-19 µs of CPU a request in turns (2026-12-08), where
it adds 2-3 µs in-process. What a request costs cold is the number of cache lines it touches, which
neither the warm loop nor the instruction count (``bench.instructions``) sees. Here, before each
request, a buffer of ``--evict-mib`` MiB is written over (32 MiB evicts every cache of this kind
of machine; 1 MiB only a core's own), then the request runs through the variant's driver, and the
variants take turns (A B C, C B A ...) so that drift hits all alike. Printed: each variant's median
µs per request, and the median of its paired differences ("added") to its family's bare app when
that was measured too, else to the first variant.

All variants run in one process, so only those without process-wide patches or background work
(``Variant.background`` false: the bare apps and our happy paths) can be measured. On 2026-12-08
``asgi.ours`` added 3.0 µs without eviction, 3.6 µs after 1 MiB and 34-38 µs after 32 MiB, to a
bare request of 12, 14 and 120-138 µs.
"""

from __future__ import annotations

import argparse
import gc
import statistics
from collections.abc import Sequence

from bench.drive import driver_for
from bench.variants import BY_NAME, IN_PROCESS, VARIANTS, bare_of, build

#: Variants that can share a process: no SDK patching process-wide state, no thread of their own.
MEASURABLE = [v.name for v in VARIANTS if IN_PROCESS in v.modes and not v.background]

_WARMUP = 300
_COLLECT_EVERY = 500  # samples between two explicit garbage collections (off while timing)


def measure(names: Sequence[str], requests: int, evict_bytes: int) -> dict[str, list[float]]:
    """µs of each of ``requests`` requests per variant, each right after ``evict_bytes`` written."""
    built = [build(name) for name in names]
    drivers = [
        driver_for(BY_NAME[name].family, b.app) for name, b in zip(names, built, strict=True)
    ]
    buffer = bytearray(evict_bytes)
    fills = (bytes(evict_bytes), b"\1" * evict_bytes)  # alternate, so every line is written
    samples: dict[str, list[float]] = {name: [] for name in names}
    order = list(zip(names, drivers, strict=True))
    try:
        for name, driver in order:
            if driver.run(_WARMUP).bad:
                raise RuntimeError(f"{name}: a warm-up response failed its check")
        gc.disable()
        for number in range(requests):
            for name, driver in order if number % 2 == 0 else order[::-1]:
                buffer[:] = fills[number % 2]
                result = driver.run(1)
                if result.bad:
                    raise RuntimeError(f"{name}: a response failed its check: {result.first_bad}")
                samples[name].append(result.elapsed_ns / 1000)
            if number % _COLLECT_EVERY == _COLLECT_EVERY - 1:
                gc.collect()
    finally:
        gc.enable()
        for driver, variant in zip(drivers, built, strict=True):
            driver.close()
            variant.close()
    return samples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cold", description=__doc__)
    parser.add_argument("variants", nargs="+", choices=MEASURABLE, metavar="VARIANT")
    parser.add_argument("--requests", type=int, default=1500, help="per variant")
    parser.add_argument("--evict-mib", type=float, default=32.0, help="0: no eviction")
    args = parser.parse_args(argv)
    if len(set(args.variants)) != len(args.variants):
        parser.error("name each variant once")
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    if args.evict_mib < 0:
        parser.error("--evict-mib must not be negative")
    try:
        samples = measure(args.variants, args.requests, int(args.evict_mib * 2**20))
    except RuntimeError as error:
        raise SystemExit(str(error)) from None
    print(f"{'µs per request, caches evicted':<32} {'median':>9} {'added':>9}  to")
    for name in args.variants:
        own = samples[name]
        bare = bare_of(BY_NAME[name].family).name
        against = bare if bare in samples else args.variants[0]
        added = statistics.median(a - b for a, b in zip(own, samples[against], strict=True))
        print(f"{name:<32} {statistics.median(own):>9.1f} {added:>+9.1f}  {against}")


if __name__ == "__main__":
    main()
