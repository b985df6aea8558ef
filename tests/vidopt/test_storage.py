import boto3
import pytest

from vidopt.storage import DownloadCache, StorageError, atomic_dir, atomic_path, list_objects, safe_relative_key


@pytest.mark.parametrize("key", ["../etc/passwd", "a/../../b.mp4", "/abs/x.mp4", "a/./b.mp4", "", "a\\..\\b"])
def test_keys_that_escape_the_cache_are_rejected(key):
    with pytest.raises(StorageError, match="rejected"):
        safe_relative_key(key)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("crash mid-write")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (dest / "old.txt").read_text() == "old"
    with atomic_dir(dest) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and [p.name for p in dest.iterdir()] == ["new.txt"]


def test_local_listing_skips_hidden_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.mp4").write_bytes(b"1")
    (tmp_path / "a" / ".DS_Store").write_bytes(b"1")
    assert [o.key for o in list_objects(str(tmp_path))] == ["a/x.mp4"]
    with pytest.raises(StorageError, match="does not exist"):
        list_objects(str(tmp_path / "missing"))


def test_s3_cache_downloads_once_and_again_on_change(moto_server, tmp_path):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="cache-test")
    s3.put_object(Bucket="cache-test", Key="clips/a/x.mp4", Body=b"first")
    objects = list_objects("s3://cache-test/clips")
    assert [o.key for o in objects] == ["a/x.mp4"]

    cache = DownloadCache(tmp_path, "s3://cache-test/clips")
    assert cache.local_path(objects[0]).read_bytes() == b"first"
    again = DownloadCache(tmp_path, "s3://cache-test/clips")
    again.local_path(list_objects("s3://cache-test/clips")[0])
    assert (cache.downloaded, again.downloaded) == (1, 0)

    s3.put_object(Bucket="cache-test", Key="clips/a/x.mp4", Body=b"second")
    changed = DownloadCache(tmp_path, "s3://cache-test/clips")
    assert changed.local_path(list_objects("s3://cache-test/clips")[0]).read_bytes() == b"second"
    assert changed.downloaded == 1
