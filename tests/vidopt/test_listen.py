"""The new-data listener against a real moto S3/SQS server process and a local folder: each object once, same-second
objects kept, non-videos ignored, restarts and crashes neither lose nor repeat anything, bursts become few batches."""
import json
import os
import threading
import time
from urllib.parse import quote_plus

import boto3
import pytest

from vidopt.config import ListenConfig
from vidopt.listen import EmitFailed, Listener, ListenError, parse_s3_notification

VIDEO_EXTENSIONS = ListenConfig().extensions


def make_listener(source, state_path, **kw) -> Listener:
    opts = dict(extensions=VIDEO_EXTENSIONS, quiet_s=0.0, max_wait_s=5.0, poll_interval_s=0.05)
    return Listener(source, state_path, **{**opts, **kw})


def flush(listener: Listener) -> list[str]:
    """One step that batches everything pending; ack every batch, return all their keys."""
    keys = []
    for batch in listener.step(flush=True):
        keys += batch.keys
        listener.ack(batch)
    return sorted(keys)


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def bucket(moto_server, request):
    s3 = boto3.client("s3")
    name = request.node.name.replace("_", "-")[:50].strip("-")
    s3.create_bucket(Bucket=name)
    return s3, name


def test_folder_reports_new_videos_once_and_ignores_the_rest(tmp_path):
    src = tmp_path / "bucket"
    touch(src / "cats" / "old.mp4")
    with make_listener(str(src), tmp_path / "state.json") as listener:
        assert flush(listener) == []  # first start: what is already there counts as seen

        touch(src / "cats" / "new.MP4")        # extension in any case
        touch(src / "dogs" / "b.webm")
        touch(src / "dogs" / "notes.txt")      # not a video
        touch(src / "dogs" / ".b.mp4.part")    # hidden temp file of a writer
        touch(src / ".trash" / "c.mp4")        # hidden folder
        moved = tmp_path / "elsewhere.mp4"     # `mv` keeps an old mtime: the ctime says it arrived now
        touch(moved)
        os.utime(moved, (946684800, 946684800))  # 2000-01-01
        moved.rename(src / "dogs" / "moved.mp4")
        assert flush(listener) == ["cats/new.MP4", "dogs/b.webm", "dogs/moved.mp4"]
        written = (tmp_path / "state.json").stat().st_mtime_ns
        assert flush(listener) == []
        assert (tmp_path / "state.json").stat().st_mtime_ns == written  # a poll with nothing new writes nothing


def test_object_in_the_same_second_as_the_last_reported_one_is_not_missed(bucket, tmp_path):
    s3, name = bucket
    with make_listener(f"s3://{name}/clips", tmp_path / "state.json") as listener:
        assert flush(listener) == []
        for attempt in range(3):  # both puts must land in one second; start right after a second boundary
            time.sleep(1 - time.time() % 1 + 0.02)
            s3.put_object(Bucket=name, Key=f"clips/{attempt}/a.mp4", Body=b"a")
            assert flush(listener) == [f"{attempt}/a.mp4"]
            s3.put_object(Bucket=name, Key=f"clips/{attempt}/b.mp4", Body=b"b")
            stamps = {s3.head_object(Bucket=name, Key=f"clips/{attempt}/{k}.mp4")["LastModified"] for k in "ab"}
            if len(stamps) == 1:
                break
            assert flush(listener) == [f"{attempt}/b.mp4"]
        else:
            pytest.fail("could not put two objects within one second")
        # b's LastModified equals the watermark: a strict `LastModified > watermark` would skip it.
        assert listener.state["watermark"] == stamps.pop().timestamp()
        assert flush(listener) == [f"{attempt}/b.mp4"]
        assert flush(listener) == []


def test_restart_reports_nothing_old_and_everything_new(bucket, tmp_path):
    s3, name = bucket
    for i in range(3):
        s3.put_object(Bucket=name, Key=f"clips/old{i}.mp4", Body=b"old")
    state = tmp_path / "state.json"
    with make_listener(f"s3://{name}/clips", state) as listener:
        assert flush(listener) == []
        s3.put_object(Bucket=name, Key="clips/x1.mp4", Body=b"1")
        assert flush(listener) == ["x1.mp4"]

    # While it is down: two new clips, x1 overwritten with new content (new ETag: new data), old0 rewritten unchanged.
    s3.put_object(Bucket=name, Key="clips/x2.mp4", Body=b"2")
    s3.put_object(Bucket=name, Key="clips/sub/x3.mkv", Body=b"3")
    s3.put_object(Bucket=name, Key="clips/x1.mp4", Body=b"1 again, longer")
    s3.put_object(Bucket=name, Key="clips/old0.mp4", Body=b"old")
    s3.put_object(Bucket=name, Key="elsewhere/x4.mp4", Body=b"4")  # outside the prefix
    with make_listener(f"s3://{name}/clips/", state) as listener:
        assert flush(listener) == ["sub/x3.mkv", "x1.mp4", "x2.mp4"]
        assert flush(listener) == []
    assert len(json.loads(state.read_text())["recent"]) == 6  # state: objects within the window only


def test_crash_between_outbox_and_emit_resends_the_same_event_id(tmp_path):
    src, state = tmp_path / "bucket", tmp_path / "state.json"
    src.mkdir()
    with make_listener(str(src), state) as listener:
        flush(listener)
        touch(src / "a" / "1.mp4")
        [batch] = listener.step(flush=True)  # recorded in the outbox ... and the process dies before emitting

    with make_listener(str(src), state) as listener:
        [again] = listener.step()
        assert (again.id, again.keys) == (batch.id, ["a/1.mp4"])
        sent = []

        def emit_fails_then_works(b):
            sent.append(b.id)
            if len(sent) == 1:
                raise EmitFailed("server unreachable")

        assert listener.run(emit_fails_then_works, once=True) == 0  # not sent: kept
        assert listener.run(emit_fails_then_works, once=True) == 1
        assert sent == [batch.id, batch.id]

    with make_listener(str(src), state) as listener:
        assert listener.step() == []


def test_second_listener_on_the_same_source_is_refused(tmp_path):
    (tmp_path / "bucket").mkdir()
    with make_listener(str(tmp_path / "bucket"), tmp_path / "state.json"):
        with pytest.raises(ListenError, match="another listener"):
            make_listener(str(tmp_path / "bucket"), tmp_path / "state.json").open()


def test_a_source_that_cannot_be_watched_fails_at_once_naming_it(moto_server, tmp_path):
    for source, why in ((f"{tmp_path}/missing", "does not exist"), ("s3://no-such-bucket/clips", "NoSuchBucket")):
        with make_listener(source, tmp_path / "state.json") as listener:
            with pytest.raises(ListenError, match=f"cannot watch .*{source.split('/')[-2]}.*{why}"):
                listener.run(lambda batch: None)


def test_a_burst_starts_at_once_then_waits_for_quiet_but_not_longer_than_max_wait(tmp_path):
    src = tmp_path / "bucket"
    src.mkdir()
    now = [0.0]
    with make_listener(str(src), tmp_path / "state.json", quiet_s=2.0, max_wait_s=3.5, poll_interval_s=1.0,
                       clock=lambda: now[0]) as listener:
        assert listener.step() == []
        touch(src / "a.mp4")
        [batch] = listener.step()  # a burst's first object goes out at once: its run need not wait for the burst
        assert batch.keys == ["a.mp4"]
        listener.ack(batch)
        now[0] = 1.0
        touch(src / "b.mp4")
        touch(src / "b2.mp4")
        assert listener.step() == [] and listener.next_wait() == 1.0  # within quiet_s of the last batch: same burst
        now[0] = 2.5
        assert listener.step() == [] and listener.next_wait() == 0.5  # quiet ends at 1.0 + 2.0
        now[0] = 3.0
        [batch] = listener.step()
        assert batch.keys == ["b.mp4", "b2.mp4"]
        listener.ack(batch)

        for t in range(4, 9):  # a new object every second: never quiet, so max_wait (3.5 s after the first) decides
            now[0] = float(t)
            touch(src / f"c{t}.mp4")
            batches = listener.step()
            if batches:
                break
        assert t == 8 and batches[0].keys == ["c4.mp4", "c5.mp4", "c6.mp4", "c7.mp4", "c8.mp4"]


def test_burst_of_50_puts_is_emitted_in_at_most_two_batches_within_seconds(bucket, tmp_path):
    s3, name = bucket
    state = tmp_path / "state.json"
    emitted: list[tuple[float, list[str]]] = []
    stop = threading.Event()
    listener = make_listener(f"s3://{name}/clips", state, quiet_s=1.0, max_wait_s=6.0, poll_interval_s=0.2).open()
    thread = threading.Thread(target=listener.run, args=(lambda b: emitted.append((time.time(), b.keys)), stop))
    thread.start()
    try:
        deadline = time.time() + 10
        while not state.exists() and time.time() < deadline:  # first listing done: later puts are new
            time.sleep(0.05)
        start = time.time()
        for i in range(50):
            s3.put_object(Bucket=name, Key=f"clips/burst/{i:02d}.mp4", Body=b"v%d" % i)
        last_put = time.time()
        assert last_put - start < 5, "the machine is too slow to put 50 objects within 5 s"
        while sum(len(keys) for _, keys in emitted) < 50 and time.time() < last_put + 15:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(10)
        listener.close()
    keys = [k for _, keys in emitted for k in keys]
    assert sorted(keys) == [f"burst/{i:02d}.mp4" for i in range(50)]  # every one, once
    assert 1 <= len(emitted) <= 2
    assert emitted[-1][0] - last_put < 4  # quiet 1 s + a poll + slack on a busy machine


def test_parse_s3_notification_formats():
    created = {"Records": [{"eventName": "ObjectCreated:Put", "eventTime": "2026-11-28T01:02:03.456Z",
                            "s3": {"bucket": {"name": "b"},
                                   "object": {"key": quote_plus("clips/a b+c.mp4"), "size": 5, "eTag": "e1"}}},
                           {"eventName": "ObjectRemoved:Delete", "eventTime": "2026-11-28T01:02:04.000Z",
                            "s3": {"bucket": {"name": "b"}, "object": {"key": "clips/x.mp4"}}}]}
    [n] = parse_s3_notification(json.dumps(created))
    assert (n.bucket, n.key, n.size, n.etag) == ("b", "clips/a b+c.mp4", 5, "e1")
    via_sns = {"Type": "Notification", "Message": json.dumps(created)}
    assert parse_s3_notification(json.dumps(via_sns)) == [n]
    assert parse_s3_notification(json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "b"})) == []


def test_sqs_mode_reads_moto_s3_notifications_and_deletes_them(bucket, tmp_path):
    s3, name = bucket
    sqs = boto3.client("sqs")
    queue_url = sqs.create_queue(QueueName=name)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3.put_bucket_notification_configuration(Bucket=name, NotificationConfiguration={
        "QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]})  # moto sends s3:TestEvent
    s3.put_object(Bucket=name, Key="clips/cats/a b+c.mp4", Body=b"1")  # arrives URL-encoded: a+b%2Bc.mp4
    s3.put_object(Bucket=name, Key="clips/cats/notes.txt", Body=b"2")
    s3.put_object(Bucket=name, Key="other/d.mp4", Body=b"3")

    def record(bucket_name, key):
        return json.dumps({"Records": [{"eventName": "ObjectCreated:Put", "eventTime": "2026-11-28T01:02:03.000Z",
                                        "s3": {"bucket": {"name": bucket_name},
                                               "object": {"key": quote_plus(key), "size": 1, "eTag": "e"}}}]})

    sqs.send_message(QueueUrl=queue_url, MessageBody=record("another-bucket", "clips/e.mp4"))
    sqs.send_message(QueueUrl=queue_url, MessageBody=record(name, "clips/../escape.mp4"))  # unsafe key
    sqs.send_message(QueueUrl=queue_url, MessageBody="not json")

    state = tmp_path / "state.json"
    with make_listener(f"s3://{name}/clips", state, sqs_queue_url=queue_url) as listener:
        keys = []
        for _ in range(5):
            keys += flush(listener)
        assert keys == ["cats/a b+c.mp4"]
        attrs = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        assert attrs == {"ApproximateNumberOfMessages": "0", "ApproximateNumberOfMessagesNotVisible": "0"}

        # At-least-once delivery: the same notification again is recognised, a new one is not.
        etag = s3.head_object(Bucket=name, Key="clips/cats/a b+c.mp4")["ETag"].strip('"')
        redelivered = json.loads(record(name, "clips/cats/a b+c.mp4"))
        redelivered["Records"][0]["s3"]["object"]["eTag"] = etag
        sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(redelivered))
        s3.put_object(Bucket=name, Key="clips/dogs/f.MOV", Body=b"4")
        assert flush(listener) + flush(listener) == ["dogs/f.MOV"]

    with make_listener(f"s3://{name}/clips", state, sqs_queue_url=queue_url) as listener:
        assert flush(listener) == []
