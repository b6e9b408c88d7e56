"""Distributed pretraining on a real local Ray: 2 gloo workers, the dictionary actor, data and
checkpoints on a real S3 endpoint on loopback. Each `fit()` costs tens of seconds on 2 cores,
so runs are tiny and each test proves as much as its run can show."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from jobs import pretrain
from service import storage
from service.errors import Failure
from service.requests import PretrainRequest
from workers.metrics import read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROJECT = Path(__file__).resolve().parents[2]
EVERY = 2  # checkpoint.every_steps of these runs
ACTOR_TIMEOUT_S = 12  # resources.actor_timeout_s where a test wedges the actor
TINY = [
    "train.batch_size=4",
    "resources.num_workers=2",
    "resources.cpus_per_worker=1",
    "resources.max_failures=2",
    "model.video.frames=4",
    "model.video.size=32",
    "model.audio.n_mels=16",
    "data.clip_seconds=0.5",
    "data.shuffle_buffer=16",
    "method.dictionary_size=16",
    "method.max_staleness=2",
    f"checkpoint.every_steps={EVERY}",
    "checkpoint.num_to_keep=3",
    "optim.warmup_steps=0",
    "train.log_every=1",
    "eval.after_training=false",  # tests/integration/test_service.py covers the evaluation
]


@pytest.fixture(scope="module")
def bucket(s3_endpoint: str) -> str:
    import boto3

    name = f"dist-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def dataset(bucket: str) -> str:
    from workers.data.synth import write_synthetic

    uri = f"{bucket}/data/synth"
    write_synthetic(uri, 48, seed=3, num_classes=4, frames=4, size=32, seconds=0.5)
    return uri


def args(run_id: str, root: str, data: str, steps: int, *extra: str) -> list[str]:
    sets = [f"--set={item}" for item in [*TINY, f"train.steps={steps}", *extra]]
    return ["--recipe", "demo", "--run-id", run_id, "--storage", root, "--data", data, *sets]


def pretrain_here(*argv: str) -> dict:
    return pretrain.pretrain(PretrainRequest.from_args(pretrain.parser().parse_args(list(argv))))


def load_final(outcome: dict, root: str):
    from ray.train import Checkpoint

    from workers.distributed.checkpoint import load_checkpoint

    filesystem, _ = storage.arrow_filesystem(root)
    return load_checkpoint(Checkpoint(outcome["checkpoint"], filesystem=filesystem))


def assert_trees_equal(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_trees_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_trees_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif hasattr(a, "shape"):  # numpy
        assert (a == b).all(), f"{where} differs"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def digests(run_uri: str) -> list[float]:
    records = [r for r in read_metrics(run_uri) if not r.get("replayed")]
    return [r["data/batch_digest"] for r in sorted(records, key=lambda r: r["step"])]


def test_resumed_run_equals_an_uninterrupted_one(ray_session, bucket, dataset, monkeypatch, tmp_path):
    """Run A stops (as on preemption) after S steps and is rerun with the same id to 2S;
    run B goes to 2S at once. Both draw the fresh candidate pool's extra clips from their
    second reader stream and keep two shadow dictionaries. Same weights, dictionaries,
    shadows, actor state and clip sequence. A also logs to MLflow and W&B (offline): the
    resumed job continues the same tracker runs. A decodes its JPEGs the way a GPU worker
    does (`data.decode=device`, the next batch prepared in a thread while the step runs),
    B on the reader's threads: on the CPU both decoders are libjpeg-turbo, so even the
    weights must be equal, and A's checkpoints must hold the cursors of the batches trained
    on, not of the one prepared ahead."""
    root = f"{bucket}/resume"
    steps = 2 * EVERY + 1  # S: the stop lands between checkpoints, so the stop writes its own
    method = ("method.pool=fresh", "method.shadow_samplers=active,moco")
    trackers = ("train.trackers=tensorboard,mlflow,wandb",)

    uninterrupted = pretrain_here(*args("uninterrupted", root, dataset, 2 * steps, *method))
    assert uninterrupted["state"] == "succeeded" and uninterrupted["step"] == 2 * steps
    assert uninterrupted["metrics"]["dict/replicas_agree"] == 1.0
    assert uninterrupted["metrics"]["dict/replicas_match_actor"] == 1.0

    method_a = (*method, "data.decode=device")
    monkeypatch.setenv("CMACC_FAULT_PREFETCH_AHEAD", "1")
    monkeypatch.setenv("CMACC_FAULT_STOP_STEP", str(steps))
    stopped = pretrain_here(*args("resumed", root, dataset, 2 * steps, *method_a, *trackers))
    assert stopped["state"] == "stopped" and stopped["step"] == steps
    monkeypatch.delenv("CMACC_FAULT_STOP_STEP")
    resumed = pretrain_here(*args("resumed", root, dataset, 2 * steps, *method_a, *trackers), "--resume")
    assert resumed["state"] == "succeeded" and resumed["step"] == 2 * steps
    assert resumed["metrics"]["dict/replicas_agree"] == 1.0
    assert resumed["metrics"]["dict/replicas_match_actor"] == 1.0

    a, b = load_final(uninterrupted, root), load_final(resumed, root)
    assert_trees_equal(a.train["query"], b.train["query"], "query encoders")
    assert_trees_equal(a.train["key"], b.train["key"], "key encoders")
    assert_trees_equal(a.train["optimizer"], b.train["optimizer"], "optimiser")
    assert_trees_equal(a.replicas, b.replicas, "replicas (with the shadows')")
    assert_trees_equal(a.actor["dictionaries"], b.actor["dictionaries"], "actor dictionaries and shadows")
    assert set(a.actor["dictionaries"]["shadows"]) == {"active", "moco"}
    assert a.actor["version"] == b.actor["version"] == 2 * steps
    assert a.readers == b.readers and a.extra_readers == b.extra_readers and len(a.extra_readers) == 2

    sequence = digests(storage.join(root, "uninterrupted"))
    assert len(sequence) == 2 * steps
    assert digests(storage.join(root, "resumed")) == sequence
    run_json = json.loads(storage.read_bytes(storage.join(root, "resumed", "run.json")))
    assert run_json["state"] == "succeeded" and run_json["last_step"] == 2 * steps
    assert_trackers_continued(storage.join(root, "resumed"), run_json["trackers"], 2 * steps, tmp_path)


def assert_trackers_continued(run_uri: str, ids: dict, steps: int, tmp_path: Path) -> None:
    """One MLflow run (read back from the run's SQLite store with MLflow's client) holding the
    parameters and every step's loss, both jobs' steps; W&B's offline run files with the
    metrics, under one run id."""
    from mlflow.tracking import MlflowClient

    database = tmp_path / "mlflow.db"
    database.write_bytes(storage.read_bytes(storage.join(run_uri, "mlflow", "mlflow.db")))
    client = MlflowClient(tracking_uri=f"sqlite:///{database}")
    runs = client.search_runs([ids["mlflow"]["experiment_id"]])
    assert [r.info.run_id for r in runs] == [ids["mlflow"]["run_id"]]
    assert runs[0].data.params["method.pool"] == "fresh"
    history = client.get_metric_history(ids["mlflow"]["run_id"], "train/loss")
    assert sorted({m.step for m in history}) == list(range(1, steps + 1))
    wandb_files = [name for name in storage.list_dir(storage.join(run_uri, "wandb")) if name.startswith("offline-run")]
    assert len(wandb_files) >= 1 and all(ids["wandb"]["id"] in name for name in wandb_files), wandb_files
    folder = storage.join(run_uri, "wandb", wandb_files[-1])
    log = next(name for name in storage.list_dir(folder) if name.endswith(".wandb"))
    assert b"train/loss" in storage.read_bytes(storage.join(folder, log))


def test_a_killed_worker_costs_at_most_the_steps_since_the_checkpoint_and_a_non_finite_loss_ends_the_run(
    ray_session, bucket, dataset, monkeypatch, tmp_path
):
    """Rank 1 is killed one step past checkpoint 2: the group restarts from it. Later the loss
    turns non-finite at step 5: every rank stops at that step, the run fails naming it, and
    the checkpoint of step 4 stays the newest, with finite weights."""
    root = f"{bucket}/worker-kill"
    monkeypatch.setenv("CMACC_FAULT_KILL_WORKER", f"1:{EVERY + 1}")  # rank 1, one step past a checkpoint
    monkeypatch.setenv("CMACC_FAULT_NAN_STEP", str(2 * EVERY + 1))
    monkeypatch.setenv("CMACC_FAULT_MARKER_DIR", str(tmp_path))
    outcome = pretrain_here(*args("worker-kill", root, dataset, 3 * EVERY))
    assert (tmp_path / f"cmacc-fault-worker-1-{EVERY + 1}").exists(), "the worker was never killed"
    records = read_metrics(storage.join(root, "worker-kill"))
    starts = [int(r["run/start_step"]) for r in records if "run/start_step" in r]
    assert starts == [0, EVERY], f"attempts started at {starts}"
    assert (EVERY + 1) - starts[-1] <= EVERY  # what the kill cost
    resumed = next(r for r in records if r.get("run/start_step") == EVERY)
    assert resumed["dict/replicas_agree"] == resumed["dict/replicas_match_actor"] == 1.0
    assert outcome["state"] == "failed"
    assert "not finite" in outcome["error"] and f"step {2 * EVERY + 1}" in outcome["error"]
    restored = load_final(outcome, root)
    assert restored.train["step"] == 2 * EVERY
    assert all(torch.isfinite(t).all() for t in restored.train["query"].values() if t.is_floating_point())
    run_json = json.loads(storage.read_bytes(storage.join(root, "worker-kill", "run.json")))
    assert run_json["state"] == "failed" and "not finite" in run_json["error"]


def test_a_killed_or_hung_actor_is_reseeded_and_one_that_keeps_dying_fails_the_run_after_the_cap(
    ray_session, bucket, dataset, monkeypatch, tmp_path
):
    """The actor is killed before step 3 and wedged before step 5 (it stops answering: after
    `resources.actor_timeout_s` it is killed and Ray restarts it): the run trains on, each
    time re-seeded from rank 0's replica, staleness bounded. From step 7 it dies at every
    step: its third failure is past `resources.max_actor_restarts = 2`, and the run fails
    with an error that says so instead of training on without dictionary updates. The last
    checkpoint before the failure stays the newest."""
    root = f"{bucket}/actor-kill"
    monkeypatch.setenv("CMACC_FAULT_KILL_ACTOR", "3")
    monkeypatch.setenv("CMACC_FAULT_HANG_ACTOR", "5")
    monkeypatch.setenv("CMACC_FAULT_CRASH_LOOP_ACTOR", "7")
    monkeypatch.setenv("CMACC_FAULT_MARKER_DIR", str(tmp_path))
    started = time.monotonic()
    extra = (f"resources.actor_timeout_s={ACTOR_TIMEOUT_S}", "resources.max_actor_restarts=2")
    outcome = pretrain_here(*args("actor-kill", root, dataset, 12, *extra))
    for marker in ("actor-3", "hang-actor-5", "crash-loop-actor-7"):
        assert (tmp_path / f"cmacc-fault-{marker}").exists(), f"{marker} never fired"
    assert time.monotonic() - started < 3000, "the hung actor held the run for its whole hour"
    records = read_metrics(storage.join(root, "actor-kill"))
    assert max(r["dict/staleness"] for r in records) <= 2
    restarts = [int(r["dict/actor_restarts"]) for r in sorted(records, key=lambda r: r["step"])]
    assert restarts[1] == 0 and 2 in restarts, restarts  # killed and wedged: both recovered
    assert outcome["state"] == "failed", outcome
    assert "failed 3 times, more than resources.max_actor_restarts = 2" in outcome["error"]
    assert 7 <= outcome["step"] <= 12
    restored = load_final(outcome, root)
    assert restored.train["step"] == (outcome["step"] - 1) // EVERY * EVERY  # none written at the failure
    run_json = json.loads(storage.read_bytes(storage.join(root, "actor-kill", "run.json")))
    assert run_json["state"] == "failed" and "max_actor_restarts" in run_json["error"]


def test_a_clip_that_kills_its_worker_twice_ends_the_run_naming_it_and_can_be_excluded(
    ray_session, bucket, monkeypatch
):
    """A clip whose decoding aborts the process (as a segfaulting decoder would) kills rank 0
    in the first attempt and again, at the same clip, in the retry from the checkpoint. The
    third attempt ends the run instead of retrying on: the error names the shard, the row
    and the clip. Rerun with the clip excluded, the run continues and finishes."""
    from service import config
    from workers.data.synth import write_synthetic
    from workers.distributed.worker import RunContext, build_reader

    root = f"{bucket}/poison-clip"
    dataset = f"{bucket}/data/synth-160"  # 14 batches per epoch on rank 0: the clip comes after checkpoints
    write_synthetic(dataset, 160, seed=3, num_classes=4, frames=4, size=32, seconds=0.5)
    steps = 16
    cfg = config.load_recipe("demo", [*TINY, f"train.steps={steps}"])
    context = RunContext(run_id="plan", data_uri=dataset, run_uri="", actor_name="", split="train")
    with build_reader(cfg, context, rank=0, world_size=2) as plan:  # the reader rank 0 trains with
        batches = [next(plan) for _ in range(13)]
    assert batches[12]["epoch"] == 0
    poison = batches[12]["clip_id"][1]  # decoded a few steps before step 13, after checkpoints 2, 4, 6
    monkeypatch.setenv("CMACC_FAULT_CRASH_CLIP", poison)
    outcome = pretrain_here(*args("poison-clip", root, dataset, steps))
    assert outcome["state"] == "failed", outcome
    assert (
        "rank 0 died twice (Fatal Python error: Aborted) while its reader was decoding the same clip"
        in outcome["error"]
    ), outcome["error"]
    assert "row " in outcome["error"] and f"(clip {poison})" in outcome["error"]
    print(outcome["error"])
    crashes = json.loads(storage.read_bytes(storage.join(root, "poison-clip", "crashes.json")))["crashes"]
    assert len(crashes) == 2, crashes
    records = read_metrics(storage.join(root, "poison-clip"))
    starts = [int(r["run/start_step"]) for r in records if "run/start_step" in r]
    # The retry resumes from the newest checkpoint Ray Train registered before the crash (under
    # load that may still be none) and replays the same clips up to the same one.
    assert len(starts) == 2, f"attempts started at {starts}"
    print(f"attempts started at steps {starts}; crashes at steps {[c['notes'][0]['step'] for c in crashes]}")

    monkeypatch.delenv("CMACC_FAULT_CRASH_CLIP")
    resumed = pretrain_here(*args("poison-clip", root, dataset, steps, f"data.exclude_clips={poison}"), "--resume")
    assert resumed["state"] == "succeeded" and resumed["step"] == steps, resumed.get("error")
    assert resumed["metrics"]["data/skipped"] >= 1


def assert_registered_checkpoints_are_whole(root: str, run_id: str, world_size: int = 2) -> list[int]:
    """Every checkpoint Ray Train registered holds every file a resume or an evaluation
    reads; the steps of those checkpoints."""
    from service import catalog, layout

    entry = catalog.read_run(root, run_id)
    registered = [c for c in entry.checkpoints if c.registered]
    for checkpoint in registered:
        names = set(storage.list_dir(checkpoint.uri))
        expected = {layout.CHECKPOINT_META, layout.TRAIN_FILE, layout.ACTOR_FILE}
        expected |= {layout.reader_file(rank) for rank in range(world_size)}
        assert expected <= names, f"{checkpoint.uri} lacks {sorted(expected - names)}"
    return [c.step for c in registered]


def test_storage_outages_during_checkpoint_uploads_are_retried_through(ray_session, bucket, dataset, fault_proxy):
    """Storage goes away for 4 s when each checkpoint's upload starts (a TCP proxy in front of
    the S3 endpoint: at checkpoint 2 every connection is reset, at 4 closed, at 6 held
    without an answer, then closed). Within the retry budget (default 60 s) the uploads and
    everything else retry through it: no attempt restarts."""
    root = f"{bucket}/outage"
    modes = ["reset", "drop", "stall"]  # one outage per checkpoint upload, each of another kind
    schedule = [(f"checkpoint-{(i + 1) * EVERY:08d}".encode(), mode) for i, mode in enumerate(modes)]
    proxy = fault_proxy(window_s=4.0, schedule=schedule)
    outcome = pretrain_here(*args("outage-retried", root, dataset, 3 * EVERY, f"storage.endpoint_url={proxy.url}"))
    assert proxy.windows_opened == 3, "an outage never happened"
    assert all(proxy.faulted_by_mode[mode] > 0 for mode in modes), proxy.faulted_by_mode
    assert outcome["state"] == "succeeded" and outcome["step"] == 3 * EVERY, outcome.get("error")
    records = read_metrics(storage.join(root, "outage-retried"))
    starts = [int(r["run/start_step"]) for r in records if "run/start_step" in r]
    assert starts == [0], f"attempts started at {starts}"
    assert assert_registered_checkpoints_are_whole(root, "outage-retried") == [EVERY, 2 * EVERY, 3 * EVERY]


def test_a_storage_outage_past_the_retry_budget_costs_at_most_the_steps_since_the_last_checkpoint(
    ray_session, bucket, dataset, fault_proxy
):
    """The same outage for 8 s with no retry budget. Where it lands decides what breaks: a
    worker's upload (the attempt fails and the group restarts) or Ray Train's controller
    writing its snapshot of registered checkpoints (the job fails, and a rerun continues).
    Either way the run resumes from the newest checkpoint registered before the outage,
    never from one uploaded in part, and every registered checkpoint is whole."""
    root = f"{bucket}/outage"
    proxy = fault_proxy(mode="reset", window_s=8.0, trigger=f"checkpoint-{2 * EVERY:08d}".encode())
    extra = (f"storage.endpoint_url={proxy.url}", "storage.retry_budget_s=0", "storage.lease_ttl_s=5")
    argv = args("outage-failed", root, dataset, 3 * EVERY, *extra)
    try:
        outcome = pretrain_here(*argv)
    except Failure as err:
        assert "training failed" in str(err)
        outcome = None
    assert proxy.windows_opened == 1 and proxy.faulted > 0, "the outage never happened"
    registered = assert_registered_checkpoints_are_whole(root, "outage-failed")
    if outcome is None:  # the job failed: continue it once storage is back
        assert registered in ([], [EVERY]), registered
        while proxy.in_window():
            time.sleep(0.2)
        time.sleep(6)  # the failed job could not release its lease during the outage: it lapses
        outcome = pretrain_here(*argv, "--resume")
    assert outcome["state"] == "succeeded" and outcome["step"] == 3 * EVERY, outcome.get("error")
    records = read_metrics(storage.join(root, "outage-failed"))
    starts = [int(r["run/start_step"]) for r in records if "run/start_step" in r]
    steps = assert_registered_checkpoints_are_whole(root, "outage-failed")
    assert steps[-1:] == [3 * EVERY]
    assert starts[0] == 0 and all(start in (0, *steps) for start in starts), (starts, steps)


def _driver(argv: list[str], address: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.pretrain", *argv, "--address", address],
        cwd=PROJECT,
        env={**os.environ, "PYTHONPATH": str(PROJECT), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(driver: subprocess.Popen) -> None:
    output, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, output[-4000:]


def test_killed_driver_rerun_continues_from_the_newest_checkpoint(ray_session, bucket, dataset):
    """While job A trains the run, job B with the same run id is refused, naming A. A is
    SIGKILLed: once its lease lapses (storage.lease_ttl_s), the record says the job was lost
    and a rerun takes the run over and resumes from the newest checkpoint."""
    from service import catalog
    from service.lease import read_lease

    root = f"{bucket}/driver-kill"
    address = ray_session.get_runtime_context().gcs_address
    argv = args("driver-kill", root, dataset, 5 * EVERY, "storage.lease_ttl_s=8")
    driver = _driver(argv, address)
    run_uri = storage.join(root, "driver-kill")
    deadline = time.monotonic() + 120
    while not (storage.exists(storage.join(run_uri, "lease.json")) and read_lease(run_uri).live()):
        assert driver.poll() is None, driver.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "job A took no lease within 120 s"
        time.sleep(0.2)
    second = _driver([*argv, "--resume"], address)  # while A starts its workers
    refused, _ = second.communicate(timeout=300)
    assert second.returncode == 2, refused[-4000:]
    assert f"run driver-kill is being trained by {socket.gethostname()} pid {driver.pid}" in refused, refused[-4000:]
    snapshot = storage.join(root, "driver-kill", "checkpoint_manager_snapshot.json")
    deadline = time.monotonic() + 300
    while not (  # the checkpoint is registered, not only uploaded
        storage.exists(snapshot) and f"checkpoint-{EVERY:08d}" in storage.read_bytes(snapshot).decode()
    ):
        assert driver.poll() is None, driver.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.5)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=60)
    deadline = time.monotonic() + 60
    while read_lease(run_uri).live():
        assert time.monotonic() < deadline, "the killed job's lease never lapsed"
        time.sleep(0.5)
    lost = catalog.read_run(root, "driver-kill").info
    assert lost["state"] == "failed" and f"pid {driver.pid}) stopped renewing" in lost["error"]

    _finish(_driver([*argv, "--resume"], address))
    records = read_metrics(storage.join(root, "driver-kill"))
    starts = [int(r["run/start_step"]) for r in records if "run/start_step" in r]
    assert starts[0] == 0 and starts[-1] >= EVERY, f"attempts started at {starts}"
    assert max(r["step"] for r in records) == 5 * EVERY
    run_json = json.loads(storage.read_bytes(storage.join(root, "driver-kill", "run.json")))
    assert run_json["state"] == "succeeded" and run_json["last_step"] == 5 * EVERY


def test_missing_data_and_unreachable_storage_fail_before_workers_start(tmp_path, monkeypatch):
    from service import config
    from workers.driver import prepare_run

    cfg = config.load_recipe("demo", TINY)
    missing = str(tmp_path / "no-data-here")
    with pytest.raises(Failure, match=missing):
        prepare_run(cfg, PretrainRequest(run_id="r", storage=str(tmp_path / "runs"), data=missing))

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    cfg = config.load_recipe("demo", [*TINY, "storage.retry_budget_s=4"])  # refused connections are retried
    with pytest.raises(Failure, match="s3://unreachable/runs"):
        prepare_run(cfg, PretrainRequest(run_id="r", storage="s3://unreachable/runs", data=missing))
