"""Config presets, recipes, overrides, YAML and validation errors."""

import pytest

from autossvh.config import DATASETS, RECIPES, SANE_RANGES, ConfigError, build_config, config_from_dict, set_value


@pytest.mark.parametrize(
    ("dataset", "frames", "dim", "mask", "batch", "a", "b", "tau_plus", "clusters", "warmup", "min_lr"),
    [
        ("activitynet", 30, 2048, 0.5, 128, 0.2, 0.01, 0.05, [250, 400, 600], 100, 1e-6),
        ("fcvid", 25, 4096, 0.75, 512, 1.0, 0.01, 0.1, [250, 500, 1000], 100, 1e-5),
        ("ucf101", 25, 4096, 0.5, 128, 1.0, 0.2, 0.1, [250, 400, 600], 50, 1e-6),
        ("hmdb51", 25, 4096, 0.7, 128, 1.0, 0.2, 0.1, [250, 400, 600], 50, 1e-6),
    ],
)
def test_presets_hold_released_values(dataset, frames, dim, mask, batch, a, b, tau_plus, clusters, warmup, min_lr):
    cfg = build_config(dataset)
    assert (cfg.data.max_frames, cfg.data.feature_size, cfg.sampler.mask_prob) == (frames, dim, mask)
    assert (cfg.train.batch_size, cfg.loss.a, cfg.loss.b, cfg.loss.tau_plus) == (batch, a, b, tau_plus)
    assert cfg.cluster.num_cluster == clusters and cfg.cluster.warmup_epoch == warmup
    assert cfg.train.min_lr == min_lr and cfg.train.lr == 1e-4 and cfg.loss.temperature == 0.5
    assert cfg.cluster.kmeans_temperature == 0.2


def test_hidden_counts_match_released_masks():
    # masked / visible per view (REFERENCE §2.2): 15/15, 18/7, 12/13, 17/8
    expected = {"activitynet": (15, 15), "fcvid": (18, 7), "ucf101": (12, 13), "hmdb51": (17, 8)}
    for dataset in DATASETS:
        cfg = build_config(dataset)
        assert (cfg.num_hidden, cfg.data.max_frames - cfg.num_hidden) == expected[dataset]


def test_recipes_switch_sampler_and_centres():
    paper = build_config("ucf101")
    released = build_config("ucf101", "released")
    assert (paper.recipe, paper.sampler.kind, paper.loss.centers) == ("paper", "adversarial", "voted")
    assert (released.sampler.kind, released.loss.centers) == ("random", "prototype")


def test_ablation_switches_and_overrides():
    cfg = build_config("hmdb51", overrides=[
        "sampler.grl=false", "sampler.kind=random", "loss.reconstruction=false", "loss.view_contrastive=false",
        "train.lr=5e-4", "cluster.num_cluster=[10, 20]", "model.nbits=32", "recipe=released",
    ])
    assert cfg.recipe == "released" and cfg.sampler.grl is False and cfg.sampler.kind == "random"
    assert not cfg.loss.reconstruction and not cfg.loss.view_contrastive and cfg.loss.p2set
    assert cfg.train.lr == 5e-4 and cfg.cluster.num_cluster == [10, 20] and cfg.model.nbits == 32
    assert isinstance(build_config("ucf101", overrides=["train.weight_decay=1"]).train.weight_decay, float)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["sampler.kind=random", "sampler.tau=0.5", "sampler.grl=false"], ["sampler.grl", "sampler.tau"]),
        (["loss.p2set=false", "loss.b=0.5", "cluster.num_cluster=[8, 16]"], ["cluster.num_cluster", "loss.b"]),
        (["loss.view_contrastive=false", "loss.tau_plus=0.2"], ["loss.tau_plus"]),
        (["cluster.kmeans_temperature=0.1"], ["cluster.kmeans_temperature"]),  # paper: voted centres
        (["recipe=released", "loss.p2set_temperature=0.1"], ["loss.p2set_temperature"]),
        (["sampler.tau=0.5", "loss.p2set_temperature=0.1"], []),
    ],
)
def test_keys_that_do_nothing_are_named_in_a_warning(overrides, named, caplog):
    with caplog.at_level("WARNING", logger="autossvh.config"):
        build_config("ucf101", overrides=overrides)
    warned = sorted(r.getMessage().split(" ")[0] for r in caplog.records)
    assert warned == named
    assert all("is set but does nothing" in r.getMessage() for r in caplog.records)


def test_saved_configs_of_earlier_versions_load_with_what_they_were_trained_with():
    saved = build_config("ucf101").to_dict()
    saved["sampler"] |= {"gumbel_noise_scale": 10.0, "gumbel_temperature": 0.5}
    del saved["model"]["hash_layer"]
    cfg = config_from_dict(saved)
    assert cfg.model.hash_layer == "released" and cfg.sampler.tau == saved["sampler"]["tau"]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("dataset: fcvid\ntrain:\n  lr: 2.0e-4\n  batch_size: 64\nmodel.nbits: 16\n")
    cfg = build_config("ucf101", config_file=path, overrides=["train.batch_size=32"])
    assert cfg.dataset == "fcvid" and cfg.train.lr == 2e-4 and cfg.train.batch_size == 32
    assert cfg.model.nbits == 16


def test_flat_round_trip():
    flat = build_config("fcvid").flat()
    assert flat["train.lr"] == 1e-4 and flat["cluster.num_cluster"] == [250, 500, 1000]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.nbits=12", "model.nbits"),
        ("model.nbits=0", "multiple of 8"),
        ("sampler.mask_prob=1.0", "sampler.mask_prob"),
        ("sampler.mask_prob=0", "strictly between 0 and 1"),
        ("sampler.mask_prob=0.02", "K must be >= 1"),
        ("train.lr=abc", "train.lr: expected a number"),
        ("train.batch_size=2.5", "train.batch_size: expected an integer"),
        ("loss.p2set=yes please", "loss.p2set: expected true or false"),
        ("train.lrr=1e-4", "train.lrr: unknown key in section 'train'; allowed: batch_size"),
        ("optim.lr=1e-4", "unknown section 'optim'"),
        ("sampler.kind=greedy", "sampler.kind: 'greedy' is not allowed; allowed: adversarial, random"),
        ("cluster.num_cluster=[250, x]", "cluster.num_cluster[1]: expected an integer"),
        ("cluster.num_cluster=[]", "cluster.num_cluster"),
        ("train.batch_size=1", "train.batch_size"),
        ("recipe=fast", "recipe: unknown recipe"),
        ("dataset=kinetics", "dataset: unknown dataset"),
        ("novalue", "expected key=value"),
        ("cluster.num_shards=0", "cluster.num_shards"),
        ("data.data_drop_rate=0.005", "data.data_drop_rate: 0.005 is not allowed; must be 0 or in (0.01, 1)"),
        ("sampler.tau=0", "sampler.tau"),
        ("loss.p2set_temperature=0", "loss.p2set_temperature"),
        ("model.hash_layer=soft", "model.hash_layer: 'soft' is not allowed; allowed: paper, released"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        build_config("ucf101", overrides=[override])
    assert message in str(info.value)


def test_k_is_at_least_one_and_below_the_frame_count():
    cfg = build_config("ucf101", overrides=["data.max_frames=2", "sampler.mask_prob=0.99"])
    assert cfg.num_hidden == 1
    with pytest.raises(ConfigError, match="K must be >= 1 and smaller than data.max_frames = 2"):
        build_config("ucf101", overrides=["data.max_frames=2", "sampler.mask_prob=0.4"])


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        build_config("ucf101", config_file=path)
    with pytest.raises(ConfigError, match="cannot read"):
        build_config("ucf101", config_file=tmp_path / "missing.yaml")


@pytest.mark.parametrize(("override", "message"), [
    ("train.lr=1e30", "train.lr: 1e+30 is not allowed; must be in [1e-08, 0.1]"),
    ("train.weight_decay=5", "train.weight_decay: 5.0 is not allowed; must be in [0, 1]"),
    ("loss.temperature=0.001", "loss.temperature: 0.001 is not allowed; must be in [0.01, 10]"),
    ("loss.p2set_temperature=50", "loss.p2set_temperature: 50.0 is not allowed; must be in [0.01, 10]"),
    ("cluster.kmeans_temperature=1e-6", "cluster.kmeans_temperature: 1e-06 is not allowed"),
    ("loss.a=1000", "loss.a: 1000.0 is not allowed; must be in [0, 100]"),
    ("sampler.tau=1e6", "sampler.tau: 1000000.0 is not allowed; must be in [0.01, 1000]"),
    ("sampler.lr_scale=1e4", "sampler.lr_scale: 10000.0 is not allowed; must be in [0.001, 1000]"),
    ("train.max_weight_norm=0", "train.max_weight_norm: 0.0 is not allowed; must be > 0"),
    ("train.max_loss=-1", "train.max_loss: -1.0 is not allowed; must be > 0"),
])
def test_scales_outside_their_sane_range_are_refused_by_name(override, message):
    with pytest.raises(ConfigError) as info:
        build_config("ucf101", overrides=[override])
    assert message in str(info.value)


def test_the_sampler_learning_rate_stays_in_the_learning_rate_range():
    assert build_config("ucf101", overrides=["train.lr=1e-4", "sampler.lr_scale=100"]).sampler.lr_scale == 100
    with pytest.raises(ConfigError, match=r"sampler.lr_scale: .*train.lr \* sampler.lr_scale = 1"):
        build_config("ucf101", overrides=["train.lr=1e-2", "sampler.lr_scale=100"])


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dataset", DATASETS)
def test_every_preset_is_inside_the_ranges_and_every_bound_is_accepted(dataset, recipe):
    flat = build_config(dataset, recipe).flat()
    for key, (low, high) in SANE_RANGES.items():
        assert low <= flat[key] <= high, key
        for bound in (low, high):  # the ranges are inclusive (min_lr 0: below the lowest train.lr)
            cfg = build_config(dataset, recipe, overrides=["train.min_lr=0"])
            set_value(cfg, key, bound)
            assert cfg.validate().flat()[key] == bound
