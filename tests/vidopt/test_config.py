import pytest

from vidopt.config import ConfigError, PipelineConfig, flatten, load_config, redact


def test_profiles_load_and_differ():
    tiny, demo = load_config("tiny"), load_config("demo")
    assert isinstance(tiny, PipelineConfig)
    assert tiny.clips.height < demo.clips.height
    assert tiny.data.sample.videos_per_class < demo.data.sample.videos_per_class


def test_override_sets_nested_value_and_parses_yaml():
    cfg = load_config("tiny", ["clips.frames=4", "data.split_fractions=[0.5, 0.25, 0.25]", "data.sample.seed=7"])
    assert cfg.clips.frames == 4
    assert cfg.data.split_fractions == (0.5, 0.25, 0.25)
    assert cfg.data.sample.seed == 7


@pytest.mark.parametrize("override, key", [
    ("clips.framez=4", "clips.framez"),
    ("nosuch.section=1", "nosuch"),
    ("clips.frames.deeper=1", "clips.frames.deeper"),
])
def test_unknown_override_key_is_named(override, key):
    with pytest.raises(ConfigError, match=f"config: {key}: unknown key"):
        load_config("tiny", [override])


def test_bad_value_is_named():
    with pytest.raises(ConfigError, match=r"config: clips.height: Input should be a valid integer"):
        load_config("tiny", ["clips.height=tall"])
    with pytest.raises(ConfigError, match=r"config: data.split_fractions: .*summing to 1"):
        load_config("tiny", ["data.split_fractions=[0.9, 0.9, 0.1]"])


def test_a_student_that_cannot_read_the_clips_is_refused_at_load():
    """Not minutes later, when the distill stage builds it after ingestion and the teacher."""
    with pytest.raises(ConfigError, match=r"distill: .* clips of 32x32: .*final feature map 2x2 is smaller than "
                                          r"pool_grid=4"):
        load_config("demo", ["clips.height=32", "clips.width=32"])
    with pytest.raises(ConfigError, match=r"stem_kernel=6 must be odd .* or equal to the stem's stride 4"):
        load_config("demo", ["distill.stem_kernel=6"])
    assert load_config("demo", ["clips.height=32", "clips.width=32", "distill.pool_grid=2"]).distill.pool_grid == 2


def test_unknown_key_in_profile_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("clips:\n  frames: 8\n  colour: red\n")
    with pytest.raises(ConfigError, match="config: clips.colour: unknown key"):
        load_config(str(bad))


def test_unknown_profile_lists_known_ones():
    with pytest.raises(ConfigError, match=r"unknown profile 'nope'.*'demo'.*'tiny'"):
        load_config("nope")


def test_malformed_override():
    with pytest.raises(ConfigError, match="not of the form key.sub=value"):
        load_config("tiny", ["clips.frames"])


def test_section_hash_changes_only_with_its_section():
    a, b = load_config("tiny"), load_config("tiny", ["clips.frames=4"])
    assert a.section_hash("data") == b.section_hash("data")
    assert a.section_hash("clips") != b.section_hash("clips")
    assert a.config_hash() != b.config_hash()


def test_section_hash_ignores_how_clips_are_decoded():
    """Decoding in more processes or in memory gives the same clips: the stages' cache keys must not change."""
    a = load_config("tiny")
    b = load_config("tiny", ["clips.loader_workers=4", "clips.memory_cache_mb=0"])
    assert a.section_hash("clips") == b.section_hash("clips") and a.config_hash() != b.config_hash()


def test_redact_masks_secrets_and_uri_credentials():
    raw = {"tracking": {"uri": "http://bob:hunter2@mlflow:5000", "api_token": "abc"}, "data": {"source": "s3://b/p"}}
    flat = flatten(redact(raw))
    assert flat["tracking.api_token"] == "***"
    assert "hunter2" not in flat["tracking.uri"] and flat["tracking.uri"].endswith("@mlflow:5000")
    assert flat["data.source"] == "s3://b/p"


@pytest.mark.parametrize("override, message", [
    ("teacher.lr=nan", "config: teacher.lr: Input should be a finite number, got 'nan'"),
    ("distill.lr=.inf", "config: distill.lr: Input should be a finite number"),
    ("prune.lr=0", "config: prune.lr: Input should be greater than 0, got 0"),
    ("teacher.weight_decay=-1", "config: teacher.weight_decay: Input should be greater than or equal to 0, got -1"),
    ("data.probe_workers=0", "config: data.probe_workers: Input should be greater than or equal to 1, got 0"),
    ("data.decoder_checks=0", "config: data.decoder_checks: Input should be greater than or equal to 1, got 0"),
    ("data.min_frames=1", "config: data.min_frames: Input should be greater than or equal to 2, got 1"),
    ("quantize.threads=[2, 0]", "config: quantize.threads.1: Input should be greater than 0, got 0"),
    ("export.targets=[]", "config: export.targets: List should have at least 1 item"),
])
def test_values_out_of_range_are_refused_at_load_naming_key_and_value(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert str(err.value).startswith(message)
