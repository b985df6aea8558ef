"""`vidopt bench ingest`: the one-pass inspection against the two-pass one, interleaved on real files."""
from vidopt.bench import ingest


def test_one_pass_picks_the_decoder_two_passes_pick_and_reports_both_times(sample_dir, capsys):
    report = ingest.main([str(sample_dir), "--limit", "6", "--checks", "12"])
    assert report["files"] == 6 and report["same_decoder"] == 6
    assert all(t > 0 for t in report["seconds"].values()) and report["speedup"] > 0
    assert "one pass is" in capsys.readouterr().out
