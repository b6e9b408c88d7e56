"""Benchmarks of the parts that must be fast (docs/performance figures come from here).

`sampler`: one dictionary selection (step 4 of the method) of P keys from a pool of N for a
global batch of M, on random unit keys: `--warmup` untimed runs, then the median of `--repeats` timed ones, with
CUDA synchronised around each. Each case runs once per k-means++ seeding asked for
(`method.seeding`), one after the other, so a comparison of seedings shares the machine's state. `cmacc bench sampler` and `python -m jobs.bench sampler` run
`jobs.bench.cli.run_sampler`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.nn import functional as F

from service import storage
from service.errors import UsageError
from workers.bench import check_device, device_name
from workers.sampler import SEEDING_SAMPLERS, resolve_pseudo_classes, select
from workers.seeding import PARALLEL_ROUNDS, seeding_round_sizes
from workers.tensors import synchronize


def time_selection(
    *,
    sampler: str,
    num_candidates: int,
    batch_size: int,
    num_picks: int,
    dim: int,
    device: torch.device,
    repeats: int,
    warmup: int,
    seed: int,
    temperature: float = 0.07,
    seeding: str = "exact",
) -> dict[str, Any]:
    """Milliseconds per selection of P = `num_picks` keys from N = `num_candidates` on
    `device`, for a global batch of M = `batch_size` clips.

    The batch is M fresh clips (none in the pool, so nothing is excluded); the pseudo-classes
    are min(M, 256) of its M queries. Returns the case, the median and every timing.
    """
    inputs = torch.Generator().manual_seed(seed)

    def unit_rows(n: int) -> torch.Tensor:
        return F.normalize(torch.randn(n, dim, generator=inputs), dim=1).to(device)

    pool_keys, queries, batch_keys = unit_rows(num_candidates), unit_rows(batch_size), unit_rows(batch_size)
    pool_ids = torch.arange(num_candidates, device=device)
    batch_ids = torch.arange(num_candidates, num_candidates + batch_size, device=device)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    timings = []
    for run in range(warmup + repeats):
        synchronize(device)
        started = time.perf_counter()
        selection = select(
            sampler,
            pool_keys=pool_keys,
            pool_ids=pool_ids,
            queries=queries,
            batch_keys=batch_keys,
            batch_ids=batch_ids,
            exclude_ids=batch_ids,
            num_picks=num_picks,
            temperature=temperature,
            num_pseudo_classes=0,
            generator=generator,
            seeding=seeding,
        )
        synchronize(device)
        if run >= warmup:
            timings.append(1000 * (time.perf_counter() - started))
    assert selection.ids.shape[0] == min(num_picks, num_candidates)
    return {
        "N": num_candidates,
        "M": batch_size,
        "P": num_picks,
        "C": resolve_pseudo_classes(0, batch_size),
        "seeding": seeding,
        # dependent steps of the k-means++ seeding (0: the sampler does not seed)
        "rounds": len(seeding_round_sizes(num_picks, PARALLEL_ROUNDS if seeding == "parallel" else None))
        if sampler in SEEDING_SAMPLERS
        else 0,
        "ms": statistics.median(timings),
        "ms_min": min(timings),
        "timings_ms": timings,
    }


def bench_sampler(
    *,
    cases: Sequence[tuple[int, int, int]],
    sampler: str = "active",
    seedings: Sequence[str] = ("exact",),
    dim: int = 128,
    device: str = "cpu",
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
    on_case: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Time every (N, M, P) case with every seeding; returns the setting and one result per
    case and seeding (the seedings of a case next to each other)."""
    torch_device = check_device(device, command="sampler")
    results = []
    for num_candidates, batch_size, num_picks in cases:
        for seeding in seedings:
            result = time_selection(
                sampler=sampler,
                num_candidates=num_candidates,
                batch_size=batch_size,
                num_picks=num_picks,
                dim=dim,
                device=torch_device,
                repeats=repeats,
                warmup=warmup,
                seed=seed,
                seeding=seeding,
            )
            results.append(result)
            if on_case is not None:
                on_case(result)
    return {
        "benchmark": "sampler",
        "sampler": sampler,
        "seedings": list(seedings),
        "device": device,
        "device_name": device_name(torch_device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "d": dim,
        "repeats": repeats,
        "warmup": warmup,
        "results": results,
    }


TABLE_HEADER = f"{'N':>7} {'M':>6} {'P':>6} {'C':>5} {'seeding':>9} {'rounds':>7} {'ms (median)':>12} {'ms (min)':>10}"


def table_row(result: dict[str, Any]) -> str:
    return (
        f"{result['N']:>7} {result['M']:>6} {result['P']:>6} {result['C']:>5} {result['seeding']:>9} "
        f"{result['rounds']:>7} {result['ms']:>12.2f} {result['ms_min']:>10.2f}"
    )


def run_sampler_command(
    args: argparse.Namespace, cases: Sequence[tuple[int, int, int]], seedings: Sequence[str] = ("exact",)
) -> int:
    """The `sampler` benchmark of `cases` (N, M, P) with each of `seedings`: a table (rows as
    they finish) or JSON, and JSON to `--out`."""
    repeats = 2 if args.quick else args.repeats
    if repeats < 1 or args.warmup < 0 or args.dim < 2:
        raise UsageError("cmacc bench sampler: --repeats must be >= 1, --warmup >= 0 and --dim >= 2")
    check_device(args.device, command="sampler")
    if not args.json:
        print(
            f"{args.sampler} selection on {args.device}, d={args.dim}, median of {repeats} after {args.warmup} warm-up"
        )
        print(TABLE_HEADER, flush=True)

    def show(result: dict[str, Any]) -> None:
        if args.json:
            print(
                f"N={result['N']} M={result['M']} P={result['P']} {result['seeding']}: {result['ms']:.2f} ms",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(table_row(result), flush=True)

    report = bench_sampler(
        cases=cases,
        sampler=args.sampler,
        seedings=seedings,
        dim=args.dim,
        device=args.device,
        repeats=repeats,
        warmup=args.warmup,
        seed=args.seed,
        on_case=show,
    )
    text = json.dumps(report, indent=2)
    if args.json:
        print(text)
    if args.out:
        storage.write_bytes(args.out, (text + "\n").encode())
    return 0
