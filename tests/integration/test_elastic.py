"""The world size is not part of the method: an elastic worker group on a real multi-node Ray
(`ray.cluster_utils.Cluster`) loses a node, continues smaller from its checkpoint and grows
back, and a run checkpointed on W workers resumes on W' with `--resume`; either way the
global batch, the dictionaries and the data cursor carry over, and every clip of the
interrupted epoch is trained exactly once (counted from the clips each rank logs)."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from service import catalog, storage
from workers.metrics import read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROJECT = Path(__file__).resolve().parents[2]
EVERY = 2  # checkpoint.every_steps
# The elastic run's length: at 0.6 s a step (CMACC_FAULT_STEP_S) long enough for Ray to
# notice a returned node (Ray Train reads the cluster's resources from an actor that
# refreshes them every 20 s) and grow the group before the run ends.
ELASTIC_STEPS = 60
TINY = [
    "train.global_batch_size=8",
    "resources.cpus_per_worker=1",
    "resources.max_failures=4",
    "model.video.frames=4",
    "model.video.size=32",
    "model.audio.n_mels=16",
    "data.clip_seconds=0.5",
    "data.shuffle_buffer=16",
    "method.dictionary_size=16",
    "method.max_staleness=0",
    f"checkpoint.every_steps={EVERY}",
    "checkpoint.num_to_keep=4",
    "optim.warmup_steps=0",
    "train.log_every=1",
    "eval.after_training=false",
]


@pytest.fixture(scope="module")
def dataset(s3_endpoint: str) -> str:
    """136 clips, 116 of them in the train split: 14.5 steps of 8 per epoch."""
    import boto3

    from workers.data.synth import write_synthetic

    bucket = f"elastic-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/data/synth"
    write_synthetic(uri, 136, seed=4, num_classes=4, frames=4, size=32, seconds=0.5)
    return uri


def driver(argv: list[str], address: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.pretrain", *argv, "--address", address],
        cwd=PROJECT,
        env={**os.environ, "PYTHONPATH": str(PROJECT), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen, timeout_s: float = 600) -> str:
    output, _ = process.communicate(timeout=timeout_s)
    assert process.returncode == 0, output[-5000:]
    return output


def argv(run_id: str, root: str, data: str, steps: int, *extra: str) -> list[str]:
    sets = [f"--set={item}" for item in [*TINY, f"train.steps={steps}", *extra]]
    return ["--recipe", "demo", "--run-id", run_id, "--storage", root, "--data", data, *sets]


def lineage(clip_log: Path) -> dict[int, list[dict]]:
    """Step -> the records of every rank of the attempt that trained that step last. An
    attempt is the group that started at a step with a number of workers (each rank writes
    its own file); the attempts of these tests' runs start at distinct steps."""
    attempts: dict[tuple[int, int], list[dict]] = collections.defaultdict(list)
    for path in clip_log.glob("clips-*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            attempts[record["attempt"], record["world_size"]].append(record)
    ordered = sorted(attempts.values(), key=lambda records: min(r["time"] for r in records))
    final: dict[int, list[dict]] = {}
    for records in ordered:  # a later attempt trains its steps again: its records win
        for step in {r["step"] for r in records}:
            final[step] = [r for r in records if r["step"] == step]
    for step, records in final.items():
        assert len({r["rank"] for r in records}) == records[0]["world_size"], f"step {step}: a rank is missing"
    return final


def first_epoch_counts(final: dict[int, list[dict]]) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for records in final.values():
        for record in records:
            counts.update(c for c, e in zip(record["clips"], record["epochs"], strict=True) if e == 0)
    return counts


def train_clips(data: str) -> set[int]:
    from workers.data.reader import ClipReader

    with ClipReader(uri=data, rank=0, world_size=1, seed=0, batch_size=1, frames=4, split="train") as reader:
        return {int(i) for i in reader._in_split.nonzero()[0]}


def wait_until(what: str, check, process: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert process.poll() is None, f"the job ended before {what}: {process.communicate()[0][-4000:]}"
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s} s"
        time.sleep(0.5)


def test_an_elastic_run_loses_a_node_continues_smaller_then_grows_back(dataset, tmp_path):
    """1-2 workers on two worker nodes of one CPU each (the driver and the actor on a head
    with no CPU for workers, as an elastic run places its actor). A node is
    removed mid-run: the group restarts with one worker from the newest checkpoint; a node
    is added back: at the next resize check the group grows to two. The run succeeds, every
    clip of the interrupted epoch is trained once, and after each resize every rank's
    dictionaries equal the actor's."""
    from ray.cluster_utils import Cluster

    root, run_id = str(tmp_path / "runs"), "elastic"
    clip_log = tmp_path / "clips"
    clip_log.mkdir()
    run_uri = storage.join(root, run_id)

    def progress() -> dict:
        entry = catalog.read_run(root, run_id) if storage.exists(storage.join(run_uri, "run.json")) else None
        return (entry.info.get("progress") or {}) if entry else {}

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0})
    try:
        nodes = [cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1)]
        cluster.wait_for_nodes()
        started = time.monotonic()
        extra = ("resources.min_workers=1", "resources.max_workers=2", "resources.resize_check_s=2")
        job = driver(
            argv(run_id, root, dataset, ELASTIC_STEPS, *extra),
            cluster.address,
            CMACC_FAULT_CLIP_LOG=str(clip_log),
            CMACC_FAULT_STEP_S="0.6",
            CMACC_PROGRESS_RECORD_S="1",
            # Right after a loss Ray Train still counts the lost node and waits this long for
            # a group of the old size (default 60 s; docs/scaling.md, "Elastic runs").
            RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="20",
            RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5",
        )
        wait_until(
            "two workers trained 5 steps", lambda: progress().get("world_size") == 2 and progress()["step"] >= 5, job
        )
        cluster.remove_node(nodes[1])
        lost_at = time.monotonic()
        wait_until("the group went on with one worker", lambda: progress().get("world_size") == 1, job)
        shrunk_s = time.monotonic() - lost_at
        one_worker_step = progress()["step"]
        cluster.add_node(num_cpus=1)
        added_at = time.monotonic()
        wait_until(
            "the group grew back to two",
            lambda: progress().get("world_size") == 2 and progress()["step"] > one_worker_step,
            job,
        )
        grown_s = time.monotonic() - added_at
        output = finish(job)
        total_s = time.monotonic() - started
    finally:
        cluster.shutdown()
    print(f"resize costs on this machine: shrink {shrunk_s:.0f} s, grow {grown_s:.0f} s; whole run {total_s:.0f} s")
    assert "cmacc: resized 2 -> 1 workers after losing node" in output, output[-4000:]
    assert "cmacc: resized 1 -> 2 workers" in output and "joining" in output, output[-4000:]

    info = json.loads(storage.read_bytes(storage.join(run_uri, "run.json")))
    assert info["state"] == "succeeded" and info["last_step"] == ELASTIC_STEPS
    records = read_metrics(run_uri)
    starts = [r for r in records if "run/start_step" in r]
    assert len(starts) >= 3 and [int(r["train/world_size"]) for r in starts][:3] == [2, 1, 2], starts
    assert all(int(r["run/start_step"]) > 0 for r in starts[1:]), "an attempt restarted from step 0"
    for record in starts[1:]:  # after each resize: every rank's replicas agree and equal the actor's
        assert record["dict/replicas_agree"] == 1.0 and record["dict/replicas_match_actor"] == 1.0, record
    final = records[-1]
    assert final["dict/replicas_agree"] == final["dict/replicas_match_actor"] == 1.0
    assert final["cluster/num_nodes"] == 2.0 and final["train/world_size"] == 2.0

    steps = lineage(clip_log)
    assert sorted(steps) == list(range(ELASTIC_STEPS))
    counts = first_epoch_counts(steps)
    assert set(counts) == train_clips(dataset) and set(counts.values()) == {1}, "a clip of epoch 0 twice or never"


def test_a_run_checkpointed_on_two_workers_resumes_on_one_and_then_on_two(ray_session, dataset, tmp_path):
    """The same run id on 2, then 1, then 2 workers (`--resume`, the global batch fixed):
    M, P, N and the dictionaries carry over; epoch 0's clips are each trained once. The
    weights are not those of a run on one worker throughout: BatchNorm statistics are per
    rank (M / W clips), gradients are averaged in another order, the re-partitioned epoch
    reaches each rank in another order and augmentations are seeded per (seed, rank, step)."""
    from jobs.pretrain import parser, pretrain
    from service.requests import PretrainRequest

    root, clip_log = str(tmp_path / "runs"), tmp_path / "clips"
    clip_log.mkdir()
    os.environ["CMACC_FAULT_CLIP_LOG"] = str(clip_log)
    try:
        outcomes = []
        for workers, stop in ((2, 5), (1, 11), (2, None)):
            extra = [f"resources.num_workers={workers}"]
            flags = ["--resume"] if outcomes else []
            if stop is not None:
                os.environ["CMACC_FAULT_STOP_STEP"] = str(stop)
            else:
                os.environ.pop("CMACC_FAULT_STOP_STEP", None)
            request = PretrainRequest.from_args(
                parser().parse_args([*argv("resize", root, dataset, 16, *extra), *flags])
            )
            outcomes.append(pretrain(request))
    finally:
        os.environ.pop("CMACC_FAULT_CLIP_LOG", None)
        os.environ.pop("CMACC_FAULT_STOP_STEP", None)
    assert [(o["state"], o["step"]) for o in outcomes] == [("stopped", 5), ("stopped", 11), ("succeeded", 16)]
    assert {o["global_batch"] for o in outcomes} == {8}
    records = read_metrics(storage.join(root, "resize"))
    starts = [r for r in records if "run/start_step" in r]
    assert [(int(r["run/start_step"]), int(r["train/world_size"])) for r in starts] == [(0, 2), (5, 1), (11, 2)]
    for record in starts[1:]:
        assert record["dict/replicas_agree"] == record["dict/replicas_match_actor"] == 1.0
    final = records[-1]
    assert final["dict/replicas_match_actor"] == 1.0 and final["dict/actor_version"] == 16.0
    # P / M = 4 of 8 from step 2 on (the stream pool is empty at step 1), the steps after each
    # resume included: the pool came back with the checkpoint.
    entered = {r["step"]: r["dict/entered_frac_v"] for r in records if "dict/entered_frac_v" in r}
    assert entered[1] == 0.0 and {entered[s] for s in range(2, 17)} == {0.5}, entered
    counts = first_epoch_counts(lineage(clip_log))
    assert set(counts) == train_clips(dataset) and set(counts.values()) == {1}
