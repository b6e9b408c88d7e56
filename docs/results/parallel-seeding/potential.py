"""The k-means potential of the exact and the parallel seeding and of random picks of the same
size (docs/results/parallel-seeding/README.md). Run from the repository root:

    .venv/bin/python docs/results/parallel-seeding/potential.py synthetic --out FILE.json
    .venv/bin/python docs/results/parallel-seeding/potential.py checkpoint CKPT_DIR DATA_DIR --out FILE.json

The potential of picks S is the sum over the available candidates of the squared distance,
in the sampler's embedding, to the nearest pick: the gradient embedding g = a (outer) u for
`active` (from the factors, never built) and the key itself for `diversity`. Every case
draws its inputs and the sampler's generator from the seed; the median over seeds is
reported with every seed's value.

* `synthetic`: unit keys in clusters, 90% of them in one head cluster (the redundant one),
  and, as the control where k-means++ has nothing to find, unit keys without structure.
* `checkpoint`: the keys (key encoders) and queries (query encoders, other modality) of a
  trained run's checkpoint on the training clips of an AV-digits set, pools of N clips
  drawn from them each seed: what the dictionary exchange hands the sampler.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch
from torch.nn import functional as F

from workers.sampler import gradient_embedding_factors, gradient_embedding_norms, select
from workers.seeding import seeding_potential

TAU = 0.07  # the method's default temperature (the avdigits recipe's 0.2 is used for its embeddings)
MAX_CLASSES = 256


def clustered(n: int, d: int, generator: torch.Generator, *, head: float = 0.9, tails: int = 64) -> torch.Tensor:
    """Unit keys: `head` of them around one centre, the rest around `tails` other centres."""
    centres = torch.randn(tails + 1, d, generator=generator)
    num_head = int(head * n)
    which = torch.cat(
        [torch.zeros(num_head, dtype=torch.long), torch.randint(1, tails + 1, (n - num_head,), generator=generator)]
    )
    return F.normalize(centres[which] + 0.3 * torch.randn(n, d, generator=generator), dim=1)


def unstructured(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=generator), dim=1)


def potentials(
    name: str, keys: torch.Tensor, queries: torch.Tensor, num_picks: int, seed: int, temperature: float
) -> dict[str, Any]:
    """Potential and seconds of exact, parallel and random picks of `num_picks` from `keys`
    [N, d]; `queries` [C, d] with C <= 256 are all the pseudo-classes (so none is drawn and
    the embedding here is the sampler's)."""
    n = keys.shape[0]
    ids = torch.arange(n)
    batch_ids = torch.arange(n, n + queries.shape[0])
    if name == "active":
        factors = (gradient_embedding_factors(keys, queries, temperature), keys)
        sq_norms = gradient_embedding_norms(*factors)
    else:
        factors, sq_norms = (keys,), (keys * keys).sum(dim=1)
    everyone = torch.ones(n, dtype=torch.bool)
    out: dict[str, Any] = {}
    for method in ("exact", "parallel", "random"):
        started = time.perf_counter()
        selection = select(
            "random" if method == "random" else name,
            pool_keys=keys,
            pool_ids=ids,
            queries=queries,
            batch_keys=queries,
            batch_ids=batch_ids,
            exclude_ids=batch_ids,
            num_picks=num_picks,
            temperature=temperature,
            num_pseudo_classes=0,
            generator=torch.Generator().manual_seed(seed),
            seeding="exact" if method == "random" else method,
        )
        out[f"{method}_s"] = time.perf_counter() - started
        out[method] = seeding_potential(factors, sq_norms, everyone, selection.indices)
    return out


def summarise(case: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    gap = median["random"] - median["exact"]
    closed = [(r["random"] - r["parallel"]) / (r["random"] - r["exact"]) for r in runs if r["random"] != r["exact"]]
    return {
        **case,
        "seeds": len(runs),
        "exact": median["exact"],
        "parallel": median["parallel"],
        "random": median["random"],
        "random_over_exact": median["random"] / median["exact"],
        "parallel_over_exact": median["parallel"] / median["exact"],
        "gap_closed": (median["random"] - median["parallel"]) / gap if gap else None,
        "gap_closed_per_seed_median": statistics.median(closed) if closed else None,
        "exact_s": median["exact_s"],
        "parallel_s": median["parallel_s"],
        "runs": runs,
    }


def row(result: dict[str, Any]) -> str:
    closed = "-" if result["gap_closed"] is None else f"{100 * result['gap_closed']:.0f}%"
    return (
        f"| {result['set']} | {result['sampler']} | {result['N']} x {result['C']} x {result['P']} | {result['seeds']} "
        f"| {result['exact']:.4g} | {result['parallel']:.4g} | {result['random']:.4g} "
        f"| {result['random_over_exact']:.2f} | {result['parallel_over_exact']:.3f} | {closed} "
        f"| {result['exact_s']:.2f} | {result['parallel_s']:.2f} |"
    )


HEADER = (
    "| set | sampler | N x C x P | seeds | exact | parallel | random | random / exact | parallel / exact "
    "| gap closed | exact s | parallel s |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def synthetic(seeds: int) -> list[dict[str, Any]]:
    results = []
    # N, M (queries: min(M, 256) pseudo-classes), P: 1 GPU stream and fresh, 8 GPUs stream and fresh
    sizes = [(512, 128, 32), (256, 128, 128), (4096, 1024, 256), (2048, 1024, 1024)]
    for set_name, make in (("clustered 90% head", clustered), ("unstructured", unstructured)):
        for name in ("active", "diversity"):
            for n, m, p in sizes:
                runs = []
                for seed in range(seeds):
                    generator = torch.Generator().manual_seed(1000 + seed)
                    keys = make(n, 128, generator)
                    queries = make(min(m, MAX_CLASSES), 128, generator)
                    runs.append(potentials(name, keys, queries, p, seed, TAU))
                result = summarise(
                    {"set": set_name, "sampler": name, "N": n, "M": m, "C": queries.shape[0], "P": p}, runs
                )
                print(row(result), flush=True)
                results.append(result)
    return results


def from_checkpoint(checkpoint: str, data: str, seeds: int) -> list[dict[str, Any]]:
    from workers.evaluate import _batches, checkpoint_config
    from workers.models import build_encoders
    from workers.probe import extract_features
    from workers.protocols import read_clip_table
    from workers.tensors import load_tensors

    cfg, meta = checkpoint_config(checkpoint)
    with open(f"{checkpoint}/train.pt", "rb") as file:
        saved = load_tensors(file.read(), where=checkpoint)["train"]
    encoders = {}
    for role in ("query", "key"):
        model = build_encoders(cfg.model)
        model.load_state_dict(saved[role])
        encoders[role] = model
    table = read_clip_table(data)
    train = [i for i, split in enumerate(table.split) if split == "train"]
    generator = torch.Generator().manual_seed(0)
    chosen = sorted(torch.tensor(train)[torch.randperm(len(train), generator=generator)[:4096]].tolist())
    batches = list(_batches(cfg, data, chosen, device=torch.device("cpu"), endpoint_url=""))
    with torch.no_grad():
        feats = {role: extract_features(model, batches, head=True) for role, model in encoders.items()}
    labels = feats["key"]["label"]
    print(
        f"checkpoint {checkpoint} (step {meta.get('step')}): {labels.shape[0]} training clips encoded, "
        f"digit 0 share {float((labels == 0).float().mean()):.2f}",
        flush=True,
    )
    temperature = cfg.method.temperature
    results = []
    # the recipe's batch M = 32 and the 8-GPU batch M = 1024 (as many clips as it has), both pools
    sizes = [(64, 32, 32), (128, 32, 8), (2048, 1024, 1024), (4096, 1024, 256)]
    for modality, other in (("video", "audio"), ("audio", "video")):
        keys_all, queries_all = feats["key"][modality], feats["query"][other]
        for name in ("active", "diversity"):
            for n, m, p in sizes:
                runs = []
                for seed in range(seeds if n <= 128 else min(seeds, 5)):  # the large exact seedings take seconds
                    g = torch.Generator().manual_seed(seed)
                    rows = torch.randperm(keys_all.shape[0], generator=g)
                    keys = keys_all[rows[:n]]
                    queries = queries_all[rows[n : n + min(m, MAX_CLASSES)]]  # the batch's queries: other clips
                    if queries.shape[0] < min(m, MAX_CLASSES):  # the pool took every clip: the batch overlaps it
                        queries = queries_all[rows[: min(m, MAX_CLASSES)]]
                    runs.append(potentials(name, keys, queries, p, seed, temperature))
                case = {"set": f"AV-digits {modality} keys", "sampler": name, "N": n, "M": m, "C": queries.shape[0]}
                result = summarise({**case, "P": p}, runs)
                print(row(result), flush=True)
                results.append(result)
    return results


INSTRUMENTS = ("fn_mass", "hardness", "neg_share", "label_entropy", "same_source_mass", "key_cos")


def shadow_table(metrics: str) -> list[dict[str, Any]]:
    """The instruments of the run's own dictionary (`dict/`) and of the `active:exact` and
    `active:parallel` shadows at every step that logged them, from a run's metrics.jsonl."""
    with open(metrics) as file:
        records = [json.loads(line) for line in file if line.strip()]
    members = {
        "random (the run's)": "dict",
        "active:exact": "shadow/active:exact",
        "active:parallel": "shadow/active:parallel",
    }
    rows = []
    for record in records:
        if "shadow/active:exact/fn_mass_v" not in record:
            continue
        row: dict[str, Any] = {"step": record["step"]}
        for label, prefix in members.items():
            for name in INSTRUMENTS:
                for m in "va":
                    row[f"{label}/{name}_{m}"] = record.get(f"{prefix}/{name}_{m}")
        rows.append(row)
    print("| step | member | " + " | ".join(f"{n} {m}" for n in INSTRUMENTS for m in "va") + " |")
    print("| --- | --- | " + " | ".join("---" for _ in INSTRUMENTS for _ in "va") + " |")
    for row in rows:
        for label in members:
            cells = [row[f"{label}/{n}_{m}"] for n in INSTRUMENTS for m in "va"]
            print(f"| {row['step']} | {label} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    one = sub.add_parser("synthetic")
    one.add_argument("--seeds", type=int, default=10)
    one.add_argument("--out")
    two = sub.add_parser("checkpoint")
    two.add_argument("checkpoint")
    two.add_argument("data")
    two.add_argument("--seeds", type=int, default=10)
    two.add_argument("--out")
    three = sub.add_parser("shadows")
    three.add_argument("metrics", help="a run's metrics/metrics.jsonl")
    three.add_argument("--out")
    args = parser.parse_args()
    if args.what == "shadows":
        rows = shadow_table(args.metrics)
        if args.out:
            with open(args.out, "w") as out:
                json.dump({"command": " ".join(sys.argv), "rows": rows}, out, indent=1)
        return 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    print(HEADER, flush=True)
    if args.what == "synthetic":
        results = synthetic(args.seeds)
    else:
        results = from_checkpoint(args.checkpoint, args.data, args.seeds)
    if args.out:
        with open(args.out, "w") as out:
            json.dump({"command": " ".join(sys.argv), "results": results}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
