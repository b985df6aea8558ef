"""The `vidopt` command: config errors exit 2 naming the key; benchmarks receive their own --options."""
from flows.cli import main


def test_bad_override_exits_2_and_names_the_key(capsys):
    assert main(["config", "--profile", "tiny", "clips.framez=4"]) == 2
    assert "config: clips.framez: unknown key" in capsys.readouterr().err


def test_config_prints_the_resolved_profile(capsys):
    assert main(["config", "--profile", "tiny", "clips.frames=6"]) == 0
    assert '"frames": 6' in capsys.readouterr().out


def test_bench_passes_leading_options_through(sample_dir, tmp_path, capsys):
    out = tmp_path / "decode.json"
    assert main(["bench", "decode", str(sample_dir), "--clips", "4", "--repeats", "1", "--frames", "4",
                 "--size", "32", "32", "--json", str(out)]) == 0
    assert "pyav" in capsys.readouterr().out and out.exists()
