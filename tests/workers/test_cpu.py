"""CPU target: of every int8 form and the fp32 file on every runtime of its own machine, the fastest among those
that agree with the reference ships, verified on the runtime it ships on."""
import json
import shutil
import tarfile
from pathlib import Path

from tests.vidopt.test_onnx_utils import negate_int8_classifier
from vidopt.onnx_utils import FORMS_INDEX, INT8_FORMS_DIR, int8_form_files
from tests.workers.conftest import for_target
from workers import cpu
from workers.common import VERIFIED_LOGITS, load_stored_clips


ORT_INT8 = {"runtimes": ["onnxruntime"], "precisions": ["int8"]}   # the int8 form's choice alone


def _shipped(result) -> bytes:
    with tarfile.open(result.artifact_uri) as tar:
        runtime = json.loads(tar.extractfile("cpu_int8/runtime.json").read())
        return tar.extractfile(f"cpu_int8/{runtime['file']}").read()


def test_ships_the_form_fastest_at_its_own_thread_count(demo_job, tmp_path):
    forms = int8_form_files(Path(demo_job.int8_dir) / INT8_FORMS_DIR)
    for threads in (1, 2):
        out = tmp_path / f"t{threads}"
        result = cpu.run_target(for_target(demo_job, "cpu", {"threads": threads, **ORT_INT8}, out_dir=str(out)))
        assert result.status == "ok", result.reason
        times, chosen = result.extra["int8_forms_best_p50_ms"], result.extra["int8_form"]
        assert set(times) == set(forms) and chosen == min(times, key=times.get)
        assert _shipped(result) == forms[chosen].read_bytes()
        assert json.loads((out / "cpu_int8" / "runtime.json").read_text())["int8_form"] == chosen
        assert result.runtime.endswith(f"({threads} thread(s))")
        assert result.parity["argmax_agreement"] >= 0.9 and result.top1 > 0.5 and result.latency_ms > 0


def test_ships_the_target_ranking_not_the_quantize_stage_choice(demo_job, tmp_path, monkeypatch):
    """Whatever this machine's ranking picks is what ships, even where the quantize stage picked another form."""
    forms_dir = Path(demo_job.int8_dir) / INT8_FORMS_DIR
    forms = int8_form_files(forms_dir)
    at_quantize = json.loads((forms_dir / FORMS_INDEX).read_text())["chosen"]
    other = next(name for name in forms if name != at_quantize)

    def other_fastest(candidates, *args, **kwargs):
        return {name: {"best_p50_ms": 1.0 if name.endswith(other) else 2.0} for name in candidates}

    monkeypatch.setattr(cpu.runtimes, "compare", other_fastest)
    result = cpu.run_target(for_target(demo_job, "cpu", ORT_INT8, out_dir=str(tmp_path)))
    assert result.status == "ok" and result.extra["int8_form"] == other
    assert _shipped(result) == forms[other].read_bytes() != (Path(demo_job.int8_dir) / cpu.INT8_FILE).read_bytes()


def test_a_form_below_the_agreement_budget_is_not_shipped(demo_job, tmp_path):
    """Forms round differently in int8; one that agrees with the reference below the registry's budget is scored and
    left out of the ranking, however fast. Here one form's classifier weights are negated, so it disagrees."""
    int8_dir = tmp_path / "int8"
    shutil.copytree(demo_job.int8_dir, int8_dir)
    forms = int8_form_files(int8_dir / INT8_FORMS_DIR)
    broken = next(iter(forms))
    negate_int8_classifier(forms[broken])
    job = for_target(demo_job, "cpu", {"min_argmax_agreement": 0.9, **ORT_INT8}, int8_dir=str(int8_dir))
    result = cpu.run_target(job.model_copy(update={"out_dir": str(tmp_path / "gated")}))
    agreement, times = result.extra["int8_forms_argmax_agreement"], result.extra["int8_forms_best_p50_ms"]
    assert set(agreement) == set(forms) and agreement[broken] < 0.9
    assert min(value for name, value in agreement.items() if name != broken) >= 0.9
    assert broken not in times and result.extra["int8_form"] != broken and result.parity["argmax_agreement"] >= 0.9
    # no form within the budget: the most faithful one ships, and the registry's gate will say why it is not promoted
    strict = cpu.run_target(for_target(job, "cpu", {"min_argmax_agreement": 1.01}, out_dir=str(tmp_path / "strict")))
    assert strict.status == "ok" and strict.extra["int8_forms_best_p50_ms"] == {}
    assert agreement[strict.extra["int8_form"]] == max(agreement.values())


def test_model_dir_without_forms_ships_its_int8_file(demo_job, tmp_path):
    int8_dir = tmp_path / "int8"
    shutil.copytree(demo_job.int8_dir, int8_dir, ignore=shutil.ignore_patterns(INT8_FORMS_DIR))
    result = cpu.run_target(for_target(demo_job, "cpu", ORT_INT8, int8_dir=str(int8_dir),
                                       out_dir=str(tmp_path / "out")))
    assert result.status == "ok", result.reason
    assert result.extra["int8_form"] == cpu.INT8_FILE and result.extra["int8_forms_best_p50_ms"] == {}
    assert _shipped(result) == (int8_dir / cpu.INT8_FILE).read_bytes()


def test_no_int8_model_fails_with_the_path(demo_job, tmp_path):
    result = cpu.run_target(for_target(demo_job, "cpu", int8_dir=str(tmp_path / "nothing"),
                                       out_dir=str(tmp_path / "out")))
    assert result.status == "failed" and str(tmp_path / "nothing" / cpu.INT8_FILE) in result.reason


def test_ships_the_fastest_runtime_form_and_precision_that_agree(demo_job, tmp_path):
    """Every runtime this machine runs, on every int8 form and the fp32 file: the fastest within the agreement budget
    ships, named with its version in runtime.json, and the package's MLflow model runs it to the verified logits."""
    import mlflow
    import numpy as np

    from vidopt import runtimes
    from vidopt.pyfunc import log_onnx_model

    result = cpu.run_target(for_target(demo_job, "cpu", {"min_argmax_agreement": 0.9}, out_dir=str(tmp_path)))
    assert result.status == "ok", result.reason
    times, agreement = result.extra["runtimes_best_p50_ms"], result.extra["runtimes_argmax_agreement"]
    forms = int8_form_files(Path(demo_job.int8_dir) / INT8_FORMS_DIR)
    assert set(agreement) == {cpu.variant_name(r, p, f) for r in runtimes.available()
                              for p, f in [("fp32", cpu.FP32_FILE), *[("int8", form) for form in forms]]}
    assert set(times) == {name for name, value in agreement.items() if value >= 0.9}
    runtime, precision, form = result.extra["runtime"], result.extra["precision"], result.extra["int8_form"]
    assert cpu.variant_name(runtime, precision, form) == min(times, key=times.get)
    on_runtime = {name: ms for name, ms in times.items() if name.startswith(f"{runtime} int8 ")}
    assert len(result.extra["int8_forms_best_p50_ms"]) == len(on_runtime)   # the report's note: forms where it ships
    package = tmp_path / "cpu_int8"
    described = json.loads((package / "runtime.json").read_text())
    assert (described["runtime"], described["precision"], described["file"]) == (runtime, precision,
                                                                               f"student_{precision}.onnx")
    assert described["runtime_version"] == runtimes.version(runtime) and result.runtime.startswith(
        runtimes.version(runtime))
    _, t, h, w = described["input"]["shape"]
    verified = np.load(tmp_path / VERIFIED_LOGITS)
    classes = described["classes"] or [f"class {i}" for i in range(verified.shape[1])]   # the demo job names none
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        experiment = mlflow.create_experiment("cpu", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = log_onnx_model(package, (t, h, w), classes)
        model = mlflow.pyfunc.load_model(info.model_uri)
        requirements = Path(mlflow.pyfunc.get_model_dependencies(info.model_uri)).read_text().split()
    finally:
        mlflow.set_tracking_uri(previous)
    stored, _ = load_stored_clips(for_target(demo_job, "cpu"))
    logits = model.predict(stored.numpy())
    assert np.abs(logits - verified).max() < 1e-3
    requirement = "openvino" if runtime.startswith("openvino") else "onnxruntime"
    assert any(r.startswith(f"{requirement}==") for r in requirements), requirements


def test_only_the_runtimes_asked_for_compete(demo_job, tmp_path):
    result = cpu.run_target(for_target(demo_job, "cpu", {"runtimes": ["onnxruntime"]}, out_dir=str(tmp_path)))
    assert result.extra["runtime"] == "onnxruntime"
    assert {name.split()[0] for name in result.extra["runtimes_argmax_agreement"]} == {"onnxruntime"}
    assert {name.split()[1] for name in result.extra["runtimes_argmax_agreement"]} == {"int8", "fp32"}
