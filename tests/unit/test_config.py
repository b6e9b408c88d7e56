import json
import re

import pytest

from service import config
from service.config import ConfigError, load_recipe

pytestmark = pytest.mark.unit


def test_every_recipe_loads_and_validates():
    assert {"demo", "paper"} <= set(config.recipe_names())
    for name in config.recipe_names():
        cfg = config.load_recipe(name)
        assert cfg.recipe == name


def test_paper_recipe_matches_the_paper_setup():
    cfg = config.load_recipe("paper")
    assert cfg.model.video.arch == "r3d_18"
    assert (cfg.model.video.frames, cfg.model.video.size) == (16, 112)
    assert cfg.train.batch_size == 128
    assert cfg.method.dictionary_size == 16384
    assert cfg.method.temperature == pytest.approx(0.07)
    assert cfg.resources.use_gpu


def test_set_overrides_convert_to_the_field_type():
    cfg = config.load_recipe(
        "demo",
        ["optim.lr=0.1", "train.steps=7", "method.sampler=random", "resources.use_gpu=true", "data.uri=s3://b/x"],
    )
    assert cfg.optim.lr == 0.1 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.method.sampler == "random"
    assert cfg.resources.use_gpu is True
    assert cfg.data.uri == "s3://b/x"


def test_integer_literals_are_accepted_for_float_fields():
    assert config.from_dict({"optim": {"lr": 1}}).optim.lr == 1.0


@pytest.mark.parametrize(
    ("override", "field_name", "words"),
    [
        ("optim.lr=abc", "optim.lr", "expected a number"),
        ("optim.lr=-1", "optim.lr", "must be > 0"),
        ("train.steps=2.5", "train.steps", "expected an integer"),
        ("method.sampler=activ", "method.sampler", "did you mean 'active'"),
        ("resources.use_gpu=maybe", "resources.use_gpu", "true or false"),
        ("model.video.size=4", "model.video.size", ">= 16"),
        ("checkpoint.every_steps=0", "checkpoint.every_steps", ">= 1"),
        ("optim.lr=inf", "optim.lr", "finite"),
        ("data.clip_seconds=nan", "data.clip_seconds", "finite"),
        ("method.temperature=-inf", "method.temperature", "finite"),
    ],
)
def test_bad_values_name_the_field(override, field_name, words):
    with pytest.raises(ConfigError) as info:
        config.load_recipe("demo", [override])
    assert info.value.field == field_name
    assert str(info.value).startswith(f"{field_name}: ")
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [("optim.lrr", "optim.lr"), ("train.step", "train.steps"), ("methd.sampler", "method.sampler")],
)
def test_unknown_keys_suggest_the_closest_name(key, suggestion):
    with pytest.raises(ConfigError) as info:
        config.load_recipe("demo", [f"{key}=1"])
    assert f"did you mean {suggestion!r}" in str(info.value)


def test_unknown_key_in_a_recipe_file_is_rejected(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[optim]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match=r"optim.learning_rate: unknown config key"):
        config.load_file(path)


def test_cross_field_check_names_the_field():
    with pytest.raises(ConfigError, match=r"^method.pseudo_classes: must be <= the global batch"):
        config.from_dict(
            {"train": {"batch_size": 8}, "resources": {"num_workers": 2}, "method": {"pseudo_classes": 17}}
        )
    assert config.from_dict(
        {"train": {"batch_size": 8}, "resources": {"num_workers": 2}, "method": {"pseudo_classes": 16}}
    )


def test_enqueue_and_pool_default_to_a_quarter_and_four_times_the_global_batch():
    cfg = config.from_dict({"train": {"batch_size": 8}, "resources": {"num_workers": 4}})  # M = 32
    assert (cfg.enqueue_per_step, cfg.pool_capacity) == (8, 128)
    tiny = config.from_dict({"train": {"batch_size": 2}})
    assert tiny.enqueue_per_step == 1  # at least one key enters per step
    moco = config.from_dict({"train": {"batch_size": 8}, "method": {"sampler": "moco", "enqueue": 2}})
    assert moco.enqueue_per_step == 8  # moco has no pool: the whole batch enters
    small = config.from_dict({"train": {"batch_size": 8}, "method": {"sampler": "moco", "dictionary_size": 4}})
    assert small.enqueue_per_step == 8  # like MoCo's queue, a batch larger than K leaves its newest K
    custom = config.from_dict({"train": {"batch_size": 8}, "method": {"enqueue": 3, "pool_size": 40}})
    assert (custom.enqueue_per_step, custom.pool_capacity) == (3, 40)


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ({"enqueue": 9}, r"^method.enqueue: must be <= the global batch M .* got 9"),
        ({"enqueue": -1}, r"^method.enqueue: must be >= 0"),
        ({"pool_size": 7}, r"^method.pool_size: must be 0 \(the default\) or >= the global batch M"),
        ({"sampler": "greedy"}, r"^method.sampler: 'greedy' is not one of"),
        ({"enqueue": 6, "dictionary_size": 4}, r"^method.enqueue: must be <= method.dictionary_size \(4\).* P = 6"),
    ],
)
def test_enqueue_pool_and_sampler_are_checked_against_the_global_batch(method, message):
    with pytest.raises(ConfigError, match=message):
        config.from_dict({"train": {"batch_size": 8}, "method": method})


def test_set_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="key=value"):
        config.load_recipe("demo", ["optim.lr"])


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ConfigError, match="did you mean 'demo'"):
        config.load_recipe("dmeo")


def test_config_round_trips_through_json():
    cfg = config.load_recipe("demo", ["optim.lr=0.3"])
    again = config.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_field_names_cover_the_names_later_issues_rely_on():
    names = set(config.field_names())
    assert {"optim.lr", "train.steps", "method.sampler", "data.uri", "checkpoint.every_steps"} <= names


# --- the world size is not part of the method ---------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field", "named"),
    [
        (
            ["resources.min_workers=2", "resources.max_workers=4", "train.global_batch_size=30"],
            "train.global_batch_size",
            "4",
        ),
        (
            ["resources.min_workers=3", "resources.max_workers=2", "train.global_batch_size=24"],
            "resources.max_workers",
            "3",
        ),
        (
            ["resources.min_workers=0", "resources.max_workers=2", "train.global_batch_size=24"],
            "resources.min_workers",
            "0",
        ),
        (["resources.min_workers=1", "resources.max_workers=2"], "train.global_batch_size", "elastic"),
        (["train.global_batch_size=12", "resources.num_workers=8"], "train.global_batch_size", "8"),
        (
            [
                "resources.max_workers=2",
                "resources.min_workers=1",
                "train.global_batch_size=8",
                "resources.use_gpu=true",
                "resources.actor_gpus=0.5",
            ],
            "resources.actor_gpus",
            "gpus_per_worker",
        ),
    ],
)
def test_elastic_and_global_batch_settings_that_cannot_run_are_refused_naming_the_field(overrides, field, named):
    with pytest.raises(ConfigError, match=rf"^{re.escape(field)}: ") as info:
        load_recipe("demo", overrides)
    assert named in str(info.value)


def test_the_global_batch_fixes_the_method_on_every_allowed_number_of_workers():
    cfg = load_recipe(
        "demo",
        [
            "resources.min_workers=1",
            "resources.max_workers=4",
            "train.global_batch_size=48",
            "method.pool=fresh",
            "method.dictionary_size=64",
        ],
    )
    assert cfg.resources.world_sizes == (1, 2, 3, 4)
    assert (cfg.global_batch_size, cfg.enqueue_per_step, cfg.pool_capacity, cfg.num_extra_clips) == (48, 48, 96, 48)
    assert [cfg.rank_batch_size(w) for w in (1, 2, 3, 4)] == [48, 24, 16, 12]
    old = load_recipe("demo", ["resources.num_workers=2"])  # an old config: M = batch_size x workers
    assert old.global_batch_size == 64 and old.rank_batch_size(2) == 32


def test_a_resume_that_cannot_continue_the_checkpoint_is_refused_naming_each_setting():
    from service.errors import UsageError
    from service.preflight import check_resume_config

    saved = load_recipe("demo").to_dict()  # trained on 1 worker of 32: M = 32
    check_resume_config(
        saved, load_recipe("demo", ["train.global_batch_size=32", "resources.num_workers=2"]), where="c"
    )
    with pytest.raises(UsageError, match="global batch M 32 -> 64") as info:
        check_resume_config(
            saved, load_recipe("demo", ["resources.num_workers=2"]), where="s3://b/r/checkpoint-00000020"
        )
    message = str(info.value)
    assert "--set train.global_batch_size=32" in message and "s3://b/r/checkpoint-00000020" in message
    with pytest.raises(UsageError, match=r"method.pool 'stream' -> 'fresh'.*method.dictionary_size 32 -> 64"):
        check_resume_config(saved, load_recipe("demo", ["method.pool=fresh", "method.dictionary_size=64"]), where="c")
