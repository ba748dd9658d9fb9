"""BenchmarkSuite end to end on CPU at tiny sizes: spec models in subprocesses, an nn.Module in-process, OOM as a
row, energy unavailable without a GPU, JSON and PNG; ``revnet bench`` writing both; docs/benchmarks.md runs."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from revnet_core.registry import backend_record
from revnet_zero.cli import BENCH_METRICS
from revnet_core.errors import ConfigError
from revnet_torch.bench import (METRICS, SPEC_KINDS, BenchmarkResults, BenchmarkSuite, ModelSpec, _child_result,
                                build_model, measure, weights_digest)

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(num_layers=2, d_model=32, num_heads=2, vocab_size=64)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def doc_run(tmp_path_factory):
    """The python blocks of docs/benchmarks.md, run in one namespace in a fresh folder: the docs' example is
    the end-to-end run these tests check (built-in specs and an nn.Module, all in-process on the CPU)."""
    folder = tmp_path_factory.mktemp("docs")
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2
    namespace = {"__name__": "__doc_example__"}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        for code in blocks:
            exec(compile(code, "docs/benchmarks.md", "exec"), namespace)
    return folder, namespace["results"]


@pytest.fixture(scope="module")
def results(doc_run):
    return doc_run[1]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """``revnet bench`` as a user runs it: the reversible model at seq 16, batch 2, the docs' tiny shape. The
    --timeout puts the cell in a subprocess, as on a GPU (it costs seconds: one cell)."""
    out = tmp_path_factory.mktemp("cli") / "bench"
    cmd = [sys.executable, "-m", "revnet_zero", "bench", "--models", "reversible", "--seq", "16",
           "--batch", "2", "--layers", "2", "--d-model", "32", "--heads", "2", "--vocab", "64", "--steps", "3",
           "--device", "cpu", "--timeout", "300", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return out, proc


def row(results, model, seq):
    (r,) = [r for r in results if r["model"] == model and r["seq"] == seq]
    return r


def test_every_cell_has_every_metric(results):
    assert [(r["model"], r["seq"], r["batch"]) for r in results] == [
        ("standard", 16, 2), ("reversible", 16, 2), ("standard", 32, 1), ("reversible", 32, 1)]
    for r in results:
        assert r["oom"] is False and "error" not in r, r
        assert r["tokens"] == r["batch"] * r["seq"]
        assert len(r["step_s_all"]) == 3 and r["step_s_median"] == sorted(r["step_s_all"])[1]
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["step_s_median"])
        assert r["time_kind"] == "CPU wall time"
        assert r["saved_bytes"] > 0 and r["live_bytes"] > 0 and r["param_and_optimizer_bytes"] > 0
        assert len(r["losses"]) == 4 and all(l == l for l in r["losses"])  # warm-up + 3 timed, finite
        # 1 warm-up + 3 timed AdamW steps on the same batch: the loss goes down.
        assert r["losses"][-1] < r["losses"][0]
        assert r["energy_available"] is False and "no GPU" in r["energy_reason"]
        assert any("scaled_dot_product" in op for op in r["attention_ops"]), r["attention_ops"]
    assert results[0]["implementation"] == "built-in plain (in-process)"  # CPU, no timeout
    assert results[1]["implementation"] == "in-process nn.Module ReversibleTransformer"


def test_reversible_saves_less_than_plain_at_each_length(results):
    for seq in (16, 32):
        plain, rev = row(results, "standard", seq), row(results, "reversible", seq)
        assert rev["saved_bytes"] < plain["saved_bytes"]
        assert rev["live_bytes"] < plain["live_bytes"]


def test_built_ins_share_weights_and_an_instance_starts_each_cell_from_its_own(results, cli_run):
    out, proc = cli_run
    assert proc.returncode == 0, proc.stderr
    cli_rows = json.loads((out / "bench.json").read_text())["rows"]
    specs = [r for r in list(results) + cli_rows if r["implementation"].startswith("built-in")]
    assert len(specs) == 3 and len({r["weights_sha256"] for r in specs}) == 1  # docs' plain x 2, the CLI's
    mine = [r for r in results if r["model"] == "reversible"]
    assert mine[0]["weights_sha256"] == mine[1]["weights_sha256"]  # restored, not trained on by the first cell
    assert mine[0]["losses"][0] == pytest.approx(mine[1]["losses"][0], rel=0.05)


def test_a_subprocess_cell_counts_what_the_in_process_cell_counts(results, cli_run):
    out, _ = cli_run
    sub = [r for r in json.loads((out / "bench.json").read_text())["rows"] if r["model"] == "reversible"][0]
    own = row(results, "reversible", 16)
    assert sub["implementation"] == "built-in reversible (subprocess)" and (sub["seq"], sub["batch"]) == (16, 2)
    # The same architecture at the same shape: the byte counts do not depend on the weights' values.
    assert (sub["saved_bytes"], sub["live_bytes"]) == (own["saved_bytes"], own["live_bytes"])


def test_environment_names_device_versions_and_command(results):
    env = results.environment
    assert env["device"].startswith("CPU") and env["device_type"] == "cpu"
    assert env["torch"] == torch.__version__ and env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert env["command"] and "corpus_sha256" in env
    assert results.settings["steps"] == 3 and results.settings["batch_sizes"] == [2, 1]
    assert results.settings["config"]["d_model"] == 32


def test_json_round_trips(results, tmp_path):
    path = results.to_json(tmp_path / "r.json")
    back = BenchmarkResults.from_json(path)
    assert list(back) == list(results)
    assert back.environment == results.environment and back.settings == results.settings
    assert json.loads(Path(path).read_text())["rows"][0]["model"] == "standard"


def test_plot_is_a_png_and_table_lists_every_cell(results, tmp_path):
    path = BenchmarkSuite().plot_results(results, tmp_path / "r.png")
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    table = results.table().splitlines()
    assert table[0].split()[:3] == ["model", "batch", "seq"]
    assert sum(1 for line in table if re.match(r"\s*(standard|reversible)\s", line)) == 4
    assert any("energy unavailable: no GPU" in line for line in table)


# --- out of memory ---------------------------------------------------------------------------------------
class RunsOutOfMemory(nn.Module):
    """A model whose forward raises out-of-memory from its ``fail_at``-th call on (0: the warm-up)."""

    def __init__(self, fail_at: int):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.calls, self.fail_at = 0, fail_at

    def forward(self, ids):
        self.calls += 1
        if self.calls > self.fail_at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return self.embed(ids).pow(2).mean()


def test_out_of_memory_is_a_row_not_a_crash(tmp_path):
    results = BenchmarkSuite().run(
        models={"warmup_oom": RunsOutOfMemory(0), "timed_oom": RunsOutOfMemory(2), "fits": RunsOutOfMemory(99)},
        sequence_lengths=[8], batch_sizes=1, steps=3, warmup=1, device="cpu")
    by = {r["model"]: r for r in results}
    assert by["warmup_oom"]["oom"] is True and by["timed_oom"]["oom"] is True
    assert "Tried to allocate" in by["timed_oom"]["oom_message"]
    assert by["fits"]["oom"] is False and by["fits"]["tokens_per_s"] > 0
    assert "OOM" in results.table()
    png = Path(plot := BenchmarkSuite().plot_results(results, tmp_path / "oom.png")).read_bytes()
    assert png[:8] == PNG_MAGIC, plot


def test_save_to_keeps_every_finished_cell(tmp_path):
    """The JSON is rewritten after each cell: a run stopped midway (a device time limit) keeps its rows."""
    path = tmp_path / "partial.json"
    seen = []

    class Stop(Exception):
        pass

    class StopsTheRun(RunsOutOfMemory):
        def forward(self, ids):
            seen.append(len(BenchmarkResults.from_json(path)) if path.exists() else 0)
            raise Stop

    with pytest.raises(Stop):
        BenchmarkSuite().run(models={"a": RunsOutOfMemory(99), "b": RunsOutOfMemory(0), "stop": StopsTheRun(99)},
                             sequence_lengths=[8], steps=1, warmup=0, device="cpu", save_to=path)
    assert seen == [2]
    assert [r["model"] for r in BenchmarkResults.from_json(path)] == ["a", "b"]


def test_measure_alone_catches_out_of_memory():
    assert measure(RunsOutOfMemory(0), 4, 1, device="cpu")["oom"] is True


def test_a_child_that_dies_or_fails_becomes_a_row():
    ok = subprocess.CompletedProcess([], 0, stdout='noise\n{"oom": false, "x": 1}\n', stderr="")
    killed = subprocess.CompletedProcess([], -9, stdout="", stderr="")
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="Traceback ...\nValueError: bad")
    assert _child_result(ok) == {"oom": False, "x": 1}
    assert _child_result(killed)["oom"] is True and "SIGKILL" in _child_result(killed)["oom_message"]
    assert _child_result(failed)["oom"] is False and "ValueError: bad" in _child_result(failed)["error"]


# --- bad arguments fail before any cell runs ------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(models={"x": "bogus"}), "unknown model 'bogus'; built-in models: plain, checkpoint, offload, reversible"),
    (dict(models={"x": 3}), "a model must be an nn.Module"),
    (dict(models={"x": {"kind": "plain", "confg": {}}}), "a model spec is a dict with 'kind'"),
    (dict(models={"x": {"kind": "plain", "config": {"d_model": 30, "num_heads": 4}}}), "d_model=30 must be divisible"),
    (dict(models={}), "models is empty"),
    (dict(sequence_lengths=[16, 1]), "must be a non-empty list of integers >= 2"),
    (dict(batch_sizes=[1, 2, 3]), "got 3 batch sizes for 2 sequence lengths"),
    (dict(batch_sizes=[0]), "must be positive integers"),
    (dict(metrics=["memory", "joy"]), "metrics ['joy'] must be"),
    (dict(optimizer="lion"), "optimizer='lion' is not one of"),
    (dict(steps=0), "steps=0 must be an integer >= 1"),
    (dict(device="cuda") if not torch.cuda.is_available() else dict(device="nonsense"), "device="),
])
def test_bad_arguments_raise_config_errors(kwargs, message):
    args = dict(models={"p": "plain"}, sequence_lengths=[16, 32], batch_sizes=[1])
    args.update(kwargs)
    with pytest.raises(ConfigError) as info:
        BenchmarkSuite(config=TINY).run(**args)
    assert message in str(info.value)


def test_built_in_weights_do_not_depend_on_the_kind():
    # reversible_rf also holds its random features (its shared weights: tests/torch/test_rf_hybrid.py)
    digests = {weights_digest(build_model(ModelSpec(kind, TINY), 16)) for kind in SPEC_KINDS if kind != "reversible_rf"}
    assert len(digests) == 1


def test_the_record_names_the_bench_modules_models_and_the_cli_its_metrics():
    assert backend_record("torch").bench_models is SPEC_KINDS and BENCH_METRICS == METRICS


# --- the command line and the docs -----------------------------------------------------------------------------
def test_revnet_bench_writes_json_and_png(cli_run):
    out, proc = cli_run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    raw = json.loads((out / "bench.json").read_text())
    assert [r["model"] for r in raw["rows"]] == ["reversible"]
    assert raw["environment"]["command"].startswith("revnet bench --models reversible --seq 16")
    assert raw["settings"]["config"]["num_layers"] == 2 and raw["settings"]["config"]["d_model"] == 32
    assert all(r["oom"] is False and r["tokens_per_s"] > 0 for r in raw["rows"])
    assert (out / "bench.png").read_bytes()[:8] == PNG_MAGIC
    assert "reversible" in proc.stdout and "bench.json" in proc.stdout


def test_docs_examples_wrote_their_files(doc_run):
    folder, results = doc_run
    assert (folder / "benchmark_results.png").read_bytes()[:8] == PNG_MAGIC
    assert BenchmarkResults.from_json(folder / "benchmark_results.json") == list(results)
