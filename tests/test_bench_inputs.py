"""Bad benchmark input: files in the wrong layout, an answer file of another benchmark, missing
images (counted and shown, never dropped); ``megatron-stgc score`` end to end and its errors."""

from __future__ import annotations

import json

import pytest

from megatron_stgc.cli import main
from megatron_stgc.eval.benchmarks import get_benchmark
from megatron_stgc.eval.benchmarks.base import (BenchmarkError, align_answers,
                                                count_missing_images)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def pope_dir(tmp_path, n=2):
    d = tmp_path / "pope"
    (d / "coco").mkdir(parents=True)
    (d / "val2014").mkdir()
    for i in range(n):
        (d / "val2014" / f"{i}.jpg").write_bytes(b"jpg")
    write_jsonl(d / "llava_pope_test.jsonl", [
        {"question_id": i, "image": f"{i}.jpg", "text": "Is there a dog?", "category": "random"}
        for i in range(n)])
    write_jsonl(d / "coco" / "coco_pope_random.json", [
        {"question_id": i, "image": f"{i}.jpg", "text": "Is there a dog?", "label": "yes"}
        for i in range(n)])
    return d


def test_question_file_in_the_wrong_layout_names_file_and_line(tmp_path):
    d = pope_dir(tmp_path)
    write_jsonl(d / "llava_pope_test.jsonl", [
        {"question_id": 0, "image": "0.jpg", "text": "Is there a dog?"},
        {"id": 1, "conversations": []}])  # a training record, not a question
    bench = get_benchmark("pope")
    with pytest.raises(BenchmarkError, match=r"llava_pope_test.jsonl:2: no 'question_id', "
                                             r"'text', 'image'"):
        bench.read_questions(bench.files(str(d)))
    (d / "llava_pope_test.jsonl").write_text('{"question_id": 0, "image": "0.jpg", "text": "a"}\n'
                                             "not json\n")
    with pytest.raises(BenchmarkError, match=r"llava_pope_test.jsonl:2: not JSON"):
        bench.read_questions(bench.files(str(d)))


def test_science_qa_file_must_be_llava_test_cqm_a_layout(tmp_path):
    d = tmp_path / "scienceqa"
    d.mkdir()
    write_jsonl(d / "llava_test_CQM-A.json", [{"id": "1"}, {"id": "2"}])  # JSON Lines
    bench = get_benchmark("sqa-img")
    with pytest.raises(BenchmarkError, match="llava_test_CQM-A.json: not a JSON file"):
        bench.read_questions(bench.files(str(d)))
    write_jsonl(d / "llava_test_CQM-A.json", [{"id": "1"}])  # one object, not a list
    with pytest.raises(BenchmarkError, match="llava_test_CQM-A.json: expected a JSON list"):
        bench.read_questions(bench.files(str(d)))
    (d / "llava_test_CQM-A.json").write_text(json.dumps([{"id": "1", "conversations": "x"}]))
    with pytest.raises(BenchmarkError, match="record 1: no 'conversations'"):
        bench.read_questions(bench.files(str(d)))


def test_mmbench_tsv_without_its_columns_is_refused(tmp_path):
    d = tmp_path / "mmbench"
    d.mkdir()
    (d / "mmbench_dev_20230712.tsv").write_text("question_id\ttext\n1\tWhat?\n")
    bench = get_benchmark("mmbench")
    with pytest.raises(BenchmarkError, match=r"lacks \['index', 'question', 'A', 'B', 'image'\]"):
        bench.read_questions(bench.files(str(d)))


def test_an_answer_file_of_another_benchmark_names_file_and_line(tmp_path):
    d = pope_dir(tmp_path)
    bench = get_benchmark("pope")
    files = bench.files(str(d))
    files.answers_file = write_jsonl(tmp_path / "gqa_answers.jsonl", [
        {"question_id": 0, "text": "yes"}, {"question_id": "20968255", "text": "table"}])
    with pytest.raises(BenchmarkError, match=r"gqa_answers.jsonl:2: question_id '20968255' is "
                                             r"not a question of pope .*llava_pope_test.jsonl"):
        bench.evaluate(files)
    # MMBench answer lines carry round_id; a VQA answer file has none
    files.answers_file = write_jsonl(tmp_path / "no_rounds.jsonl", [{"question_id": 0, "text": "A"}])
    mmbench = get_benchmark("mmbench")
    with pytest.raises(BenchmarkError, match=r"no_rounds.jsonl:1: not an answer line of mmbench"):
        align_answers([{"key": "0\x000"}], files.answers_file, mmbench.answer_key, "mmbench")
    files.answers_file = write_jsonl(tmp_path / "twice.jsonl", [{"question_id": 0, "text": "yes"},
                                                                {"question_id": 0, "text": "no"}])
    with pytest.raises(BenchmarkError, match=r"twice.jsonl:2: question 0 answered twice"):
        bench.evaluate(files)


def test_missing_images_are_counted_and_shown(tmp_path):
    d = pope_dir(tmp_path, n=3)
    (d / "val2014" / "2.jpg").unlink()
    bench = get_benchmark("pope")
    files = bench.files(str(d))
    questions = bench.read_questions(files)
    assert count_missing_images(questions, files.image_folder) == ["2.jpg"]
    # eval answers such a question with the loader's error instead of dropping it
    files.answers_file = write_jsonl(tmp_path / "a.jsonl", [
        {"question_id": 0, "text": "yes", "metadata": {}},
        {"question_id": 1, "text": "yes", "metadata": {}},
        {"question_id": 2, "text": "", "metadata": {"error": "missing_image: /x/2.jpg"}}])
    result = bench.evaluate(files)
    assert result["counts"]["missing_images"] == 1
    assert result["per_category"]["random"]["accuracy"] == pytest.approx(200 / 3)  # 2 of 3
    assert "missing images 1" in bench.format(result)


def test_score_command_end_to_end(tmp_path, capsys):
    d = pope_dir(tmp_path)
    answers = write_jsonl(d / "answers.jsonl", [{"question_id": 0, "text": "Yes"},
                                                {"question_id": 1, "text": "No"}])
    results = tmp_path / "results.json"
    assert main(["score", "--benchmark", "pope", "--benchmark-dir", str(d), "--answers-file",
                 answers, "--results-file", str(results)]) == 0
    scores = json.loads(results.read_text())
    assert scores["per_category"]["random"]["accuracy"] == pytest.approx(50.0)  # yes right, no not
    assert "eval: pope" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--benchmark", "coco"], "--benchmark 'coco' is not one of llava, vqav2"),
    (["--benchmark", "gqa"], "--benchmark gqa needs --benchmark-dir"),
    (["--benchmark", "gqa", "--benchmark-dir", "{d}"],
     "--question-file: {d}/llava_gqa_testdev_balanced.jsonl does not exist "
     "(from --benchmark-dir {d})"),
    (["--benchmark", "pope", "--benchmark-dir", "{pope}", "--annotations", "{d}/none"],
     "--annotations: {d}/none does not exist"),
    (["--benchmark", "pope", "--benchmark-dir", "{pope}", "--ground-truth", "{d}"],
     "--ground-truth is the llava benchmark's"),
])
def test_score_command_errors_name_the_flag(tmp_path, capsys, flags, message):
    pope = pope_dir(tmp_path)
    values = {"d": str(tmp_path), "pope": str(pope)}
    argv = ["score", "--answers-file", str(tmp_path / "a.jsonl")] + [f.format(**values)
                                                                      for f in flags]
    assert main(argv) == 2
    assert message.format(**values) in capsys.readouterr().err


def test_score_command_reports_a_bad_answers_file(tmp_path, capsys):
    d = pope_dir(tmp_path)
    (tmp_path / "a.jsonl").write_text('{"question_id": 5, "text": "yes"}\n')
    assert main(["score", "--benchmark", "pope", "--benchmark-dir", str(d),
                 "--answers-file", str(tmp_path / "a.jsonl")]) == 2
    assert "benchmark file error: answers file" in capsys.readouterr().err
