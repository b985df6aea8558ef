import os
import pickle

import boto3
import pytest
from pydantic import ValidationError

from tests.conftest import MARKER_SECRET
from vidopt.store import MARKER, ArtifactStore, FileRef, NoSuchObject, StoreError, StoreSpec, store_for
from vidopt.storage import sha256_file


def make_model_dir(folder, weights=b"w" * 1000):
    (folder / "sub").mkdir(parents=True)
    (folder / "weights.safetensors").write_bytes(weights)
    (folder / "arch.json").write_text('{"widths": [8, 16]}')
    (folder / "sub" / "metrics.json").write_text('{"top1": 0.5}')
    return folder


def tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def count_calls(store):
    """Names of the S3 operations `store` sends from now on (GetObject, HeadObject, ...)."""
    calls = []
    store.client.meta.events.register("before-call.s3.*", lambda model, **_: calls.append(model.name))
    return calls


@pytest.fixture
def bucket(moto_server, request):
    name = request.node.name.replace("_", "-")[:50].lower()
    boto3.client("s3").create_bucket(Bucket=name)
    return name


# ---- local --------------------------------------------------------------------------------------------------------

def test_local_files_and_folders_round_trip(tmp_path):
    store = store_for(str(tmp_path / "store"))
    src = tmp_path / "clip.bin"
    src.write_bytes(b"abc")
    ref = store.put_file(src, store.uri("ingest", "clip.bin"))
    assert ref.uri == f"{tmp_path}/store/ingest/clip.bin" and ref.sha256 == sha256_file(src)
    assert store.get_file(ref).read_bytes() == b"abc" and store.has(ref.uri)

    store.write_text(store.uri("runs/r1.json"), '{"ok": true}')
    assert store.read_text(store.uri("runs/r1.json")) == '{"ok": true}'

    model = make_model_dir(tmp_path / "work" / "teacher")
    digest = store.put_dir(model, store.uri("teacher"))
    assert store.has(store.uri("teacher")) and not store.has(store.uri("student"))
    assert tree(store.get_dir(store.uri("teacher"))) == {**tree(model), MARKER: (store.get_dir(store.uri("teacher"))
                                                                                / MARKER).read_bytes()}
    assert store.put_dir(model, store.uri("teacher")) == digest  # same content, same digest
    assert store.list(store.uri("teacher")) == sorted(f"{tmp_path}/store/teacher/{r}" for r in
                                                      ["arch.json", "sub/metrics.json", "weights.safetensors", MARKER])
    (model / "arch.json").write_text("{}")
    assert store.put_dir(model, store.uri("teacher")) != digest

    store.delete(store.uri("teacher"))
    assert not store.has(store.uri("teacher")) and not (tmp_path / "store" / "teacher").exists()
    with pytest.raises(NoSuchObject, match="teacher: not a published folder"):
        store.get_dir(store.uri("teacher"))


def test_local_put_onto_itself_is_a_no_op(tmp_path):
    store = store_for(str(tmp_path))
    path = tmp_path / "ckpt" / "weights.bin"
    path.parent.mkdir()
    path.write_bytes(b"weights")
    before = path.stat()
    ref = store.put_file(path, store.uri("ckpt", "weights.bin"))
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert ref.sha256 == sha256_file(path) and [p.name for p in path.parent.iterdir()] == ["weights.bin"]

    folder = make_model_dir(tmp_path / "model")
    inode = folder.stat().st_ino
    store.put_dir(folder, store.uri("model"))  # in place: only the marker is added
    assert folder.stat().st_ino == inode and store.get_dir(store.uri("model")) == folder


def test_local_file_that_does_not_match_its_ref_is_rejected(tmp_path):
    store = store_for(str(tmp_path))
    (tmp_path / "a.bin").write_bytes(b"tampered")
    with pytest.raises(StoreError, match=r"a\.bin: sha256 mismatch \(expected 000000000000\.\., got "):
        store.get_file(FileRef(uri=store.uri("a.bin"), sha256="0" * 64))
    with pytest.raises(NoSuchObject, match="b.bin: no such object"):
        store.get_file(store.uri("b.bin"))


@pytest.mark.parametrize("parts", [("..", "x"), ("a/../../b",), ("/abs",), ("a//b",)])
def test_uri_rejects_keys_that_escape_the_root(tmp_path, parts):
    with pytest.raises(StoreError, match="rejected"):
        store_for(str(tmp_path)).uri(*parts)


def test_uris_outside_the_root_and_bad_specs_are_rejected(tmp_path):
    store = store_for(str(tmp_path / "store"))
    with pytest.raises(StoreError, match="not under the store root"):
        store.read_text("relative/elsewhere.json")
    with pytest.raises(StoreError, match="not under the store root"):
        store_for("s3://bucket/runs").get_file(str(tmp_path / "a-local-path-of-another-machine.json"))
    (tmp_path / "elsewhere.json").write_text("{}")   # a local store reads this machine's files wherever they are
    assert store.read_text(str(tmp_path / "elsewhere.json")) == "{}"
    with pytest.raises(StoreError, match="needs a local store"):
        ArtifactStore(StoreSpec(root="s3://b/p")).local_path("s3://b/p/x")
    with pytest.raises(ValidationError, match="must be absolute"):
        StoreSpec(root="relative/dir")
    with pytest.raises(ValidationError, match="must not carry"):
        StoreSpec(root="s3://b", endpoint_url="http://key:secret@minio:9000")
    assert StoreSpec(root="s3://b/p/").root == "s3://b/p"


# ---- S3 (a real moto server) ----------------------------------------------------------------------------------------

def test_s3_folder_published_on_one_node_is_read_on_another(bucket, tmp_path):
    writer = store_for(f"s3://{bucket}/runs/r1", cache_dir=tmp_path / "node-a")
    model = make_model_dir(tmp_path / "work" / "student")
    uri = writer.uri("student")
    digest = writer.put_dir(model, uri)

    reader = pickle.loads(pickle.dumps(ArtifactStore(writer.spec, cache_dir=tmp_path / "node-b")))  # as Ray sends it
    calls = count_calls(reader)
    local = reader.get_dir(uri)
    assert local == tmp_path / "node-b" / "dirs" / digest and tree(local) == tree(model)
    assert calls.count("GetObject") == 1 + 3  # the marker, then each file once
    inodes = {p: p.stat().st_ino for p in local.rglob("*")}

    calls.clear()
    assert reader.get_dir(uri) == local
    assert calls == ["GetObject"]  # only the marker: nothing downloaded again
    assert {p: p.stat().st_ino for p in local.rglob("*")} == inodes

    calls = count_calls(writer)
    assert writer.put_dir(model, uri) == digest and calls == ["GetObject"]  # re-publishing unchanged content
    assert sorted(reader.list(writer.uri("student"))) == [f"{uri}/{r}" for r in
                                                          ["_COMPLETE.json", "arch.json", "sub/metrics.json",
                                                           "weights.safetensors"]]
    writer.delete(uri)
    assert not reader.has(uri) and reader.list(uri) == []


def test_republished_folder_replaces_the_old_one(bucket, tmp_path):
    store = store_for(f"s3://{bucket}", cache_dir=tmp_path / "cache")
    model = make_model_dir(tmp_path / "model")
    first = store.put_dir(model, store.uri("m"))
    (model / "arch.json").unlink()
    (model / "weights.safetensors").write_bytes(b"v2")
    calls = count_calls(store)
    second = store.put_dir(model, store.uri("m"))
    assert second != first and calls.count("PutObject") == 2  # the changed file and the marker; metrics.json stays
    assert tree(store.get_dir(store.uri("m"))) == tree(model)
    assert store.list(store.uri("m")) == [store.uri("m", r) for r in [MARKER, "sub/metrics.json",
                                                                      "weights.safetensors"]]


def test_concurrent_readers_on_one_node_both_get_correct_copies(bucket, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    writer = store_for(f"s3://{bucket}", cache_dir=tmp_path / "writer")
    model = make_model_dir(tmp_path / "model", weights=os.urandom(300_000))
    writer.put_dir(model, writer.uri("m"))
    ref = writer.put_file(model / "weights.safetensors", writer.uri("w.bin"))
    readers = [store_for(f"s3://{bucket}", cache_dir=tmp_path / "node") for _ in range(4)]  # separate processes
    with ThreadPoolExecutor(4) as pool:
        dirs = list(pool.map(lambda r: r.get_dir(r.uri("m")), readers))
        files = list(pool.map(lambda r: r.get_file(ref), readers))
    assert all(tree(d) == tree(model) for d in dirs) and len(set(dirs)) == 1
    assert all(f.read_bytes() == (model / "weights.safetensors").read_bytes() for f in files)
    assert [p.name for p in (tmp_path / "node" / "dirs").iterdir()] == [dirs[0].name]  # no temp folders left


def test_relative_local_root_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert store_for("artifacts").spec.root == str(tmp_path / "artifacts")


def test_folder_without_marker_is_not_published(bucket, tmp_path):
    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key="p/teacher/weights.safetensors", Body=b"half")  # crashed before the marker
    store = store_for(f"s3://{bucket}/p", cache_dir=tmp_path)
    assert store.has(store.uri("teacher/weights.safetensors"))
    assert not store.has(store.uri("teacher"))
    with pytest.raises(StoreError, match=f"s3://{bucket}/p/teacher: not a published folder"):
        store.get_dir(store.uri("teacher"))


def test_object_tampered_after_publishing_is_detected(bucket, tmp_path):
    store = store_for(f"s3://{bucket}", cache_dir=tmp_path / "cache")
    uri = store.uri("pruned")
    store.put_dir(make_model_dir(tmp_path / "pruned"), uri)
    boto3.client("s3").put_object(Bucket=bucket, Key="pruned/arch.json", Body=b'{"widths": [1, 1]}')
    with pytest.raises(StoreError, match=f"{uri}/arch.json: sha256 mismatch"):
        store.get_dir(uri)
    assert not (tmp_path / "cache" / "dirs").exists() or not any((tmp_path / "cache" / "dirs").iterdir())


def test_damaged_cache_copy_is_fetched_again(bucket, tmp_path):
    store = store_for(f"s3://{bucket}", cache_dir=tmp_path / "cache")
    uri = store.uri("int8")
    store.put_dir(make_model_dir(tmp_path / "int8"), uri)
    local = store.get_dir(uri)
    (local / "weights.safetensors").write_bytes(b"bit rot")
    calls = count_calls(store)
    assert store.get_dir(uri) == local and (local / "weights.safetensors").read_bytes() == b"w" * 1000
    assert calls.count("GetObject") == 4

    src = tmp_path / "clip.bin"
    src.write_bytes(b"clip")
    path = store.get_file(store.put_file(src, store.uri("clip.bin")))
    path.write_bytes(b"clop")
    assert store.get_file(FileRef(uri=store.uri("clip.bin"), sha256=sha256_file(src))).read_bytes() == b"clip"


def test_s3_file_ref_downloads_once_verified(bucket, tmp_path):
    src = tmp_path / "weights.bin"
    src.write_bytes(os.urandom(5000))
    ref = store_for(f"s3://{bucket}/p", cache_dir=tmp_path / "a").put_file(src, f"s3://{bucket}/p/ckpt/weights.bin")
    reader = store_for(f"s3://{bucket}/p", cache_dir=tmp_path / "b")
    calls = count_calls(reader)
    path = reader.get_file(ref)
    assert path == tmp_path / "b" / "files" / ref.sha256 / "weights.bin" and path.read_bytes() == src.read_bytes()
    assert calls.count("GetObject") == 1
    calls.clear()
    assert reader.get_file(ref) == path and calls == []  # cached: no request at all

    with pytest.raises(StoreError, match=r"p/ckpt/weights.bin: sha256 mismatch \(expected 111111111111"):
        reader.get_file(FileRef(uri=ref.uri, sha256="1" * 64))
    assert not (tmp_path / "b" / "files" / ("1" * 64) / "weights.bin").exists()


def test_s3_plain_uri_is_cached_until_the_object_changes(bucket, tmp_path):
    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key="p/labels.csv", Body=b"a,1")  # written by someone else: no sha256 metadata
    store = store_for(f"s3://{bucket}/p", cache_dir=tmp_path)
    calls = count_calls(store)
    first = store.get_file(store.uri("labels.csv"))
    assert first.read_bytes() == b"a,1" and store.get_file(store.uri("labels.csv")) == first
    assert calls.count("GetObject") == 1 and calls.count("HeadObject") == 2
    s3.put_object(Bucket=bucket, Key="p/labels.csv", Body=b"a,2")
    assert store.get_file(store.uri("labels.csv")).read_bytes() == b"a,2"


def test_s3_missing_object_and_bucket_are_named(bucket, tmp_path):
    store = store_for(f"s3://{bucket}/p", cache_dir=tmp_path)
    with pytest.raises(NoSuchObject, match=f"s3://{bucket}/p/none.json: no such object"):
        store.read_text(store.uri("none.json"))
    with pytest.raises(NoSuchObject, match="no such object"):
        store.get_file(FileRef(uri=store.uri("none.bin"), sha256="2" * 64))

    missing = "no-such-bucket-here"
    gone = store_for(f"s3://{missing}/p", cache_dir=tmp_path)
    for call in (lambda: gone.read_text(gone.uri("a.json")), lambda: gone.has(gone.uri("a")),
                 lambda: gone.get_file(FileRef(uri=gone.uri("a"), sha256="3" * 64)),
                 lambda: gone.write_text(gone.uri("a.json"), "{}")):
        with pytest.raises(StoreError, match=f"s3://{missing}/p/a.*: no such bucket '{missing}'") as info:
            call()
        assert info.value.__cause__ is not None and MARKER_SECRET not in str(info.value)
    src = tmp_path / "x.bin"
    src.write_bytes(b"x")
    with pytest.raises(StoreError, match=f"s3://{missing}/p/x.bin: .*NoSuchBucket"):
        gone.put_file(src, gone.uri("x.bin"))
