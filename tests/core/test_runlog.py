"""A run's files: the JSONL log every trainer writes, its truncation on resume, the result file, the plot.
No framework."""

import json

from revnet_core.runlog import eval_line, plot_log, read_log, truncate_log, write_json


def records(steps, kind="train"):
    return [{"kind": kind, "step": s, "loss": 5.0 - s / 10, "mem_bytes": 2**20 * (1 + s)} for s in steps]


def write_log(path, recs, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + tail)
    return path


def test_truncate_drops_steps_past_the_checkpoint_and_a_line_cut_short(tmp_path):
    header = {"kind": "run", "step": 0, "mem_kind": "cpu_rss"}
    log = write_log(tmp_path / "log.jsonl", [header, *records(range(1, 7))], tail='{"kind": "train", "st')
    truncate_log(log, 4)
    assert [r["step"] for r in read_log(log)] == [0, 1, 2, 3, 4]
    assert not (tmp_path / "log.jsonl.tmp").exists()
    with open(log, "a") as f:  # the resumed run appends after the kept records
        f.write(json.dumps(records([5])[0]) + "\n")
    assert [r["step"] for r in read_log(log)][-2:] == [4, 5]


def test_write_json_replaces_the_file_whole(tmp_path):
    path = tmp_path / "run.json"
    path.write_text("old")
    write_json(path, {"step": 3, "path": tmp_path})  # what json cannot write goes as str
    assert json.loads(path.read_text()) == {"step": 3, "path": str(tmp_path)}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_eval_line_names_what_the_record_holds():
    assert eval_line({"step": 3, "eval_loss": 1.5, "eval_bits_per_byte": 2.16404}) == \
        "step 3: eval loss 1.5000, bits per byte 2.1640"
    assert eval_line({"step": 9, "eval_loss": 0.25, "eval_bits_per_token": 0.36, "eval_accuracy": 0.5}) == \
        "step 9: eval loss 0.2500, bits per token 0.3600, accuracy 0.500"


def test_plot_of_loss_and_memory_is_a_png(tmp_path):
    evals = [{"kind": "eval", "step": 3, "eval_loss": 4.2}]
    log = write_log(tmp_path / "log.jsonl", [{"kind": "run", "step": 0, "mem_kind": "cuda_max_allocated"},
                                             *records(range(1, 6)), *evals])
    png = plot_log(log, tmp_path / "train.png")
    assert png == tmp_path / "train.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
