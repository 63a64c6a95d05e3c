"""The interface every benchmark implements, and the default file layout it resolves."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Optional

from megatron_stgc.eval.benchmarks.base import (BenchmarkFiles, Defaults, align_answers,
                                                default_answer_key, format_report, report)


class Benchmark:
    """One benchmark: its default layout, how its questions are read and how answers are
    scored / turned into the benchmark server's submission file."""

    name: str = ""
    defaults: Defaults

    # -------------------------------------------------------------- files

    def files(self, benchmark_dir: Optional[str], *, question_file: Optional[str] = None,
              image_folder: Optional[str] = None, annotations: Optional[str] = None,
              answers_file: Optional[str] = None, submission_file: Optional[str] = None,
              prompt_suffix: Optional[str] = None, model_id: str = "model") -> BenchmarkFiles:
        """Explicit paths win; the rest come from ``benchmark_dir`` (MoE-LLaVA's
        ``eval/<benchmark>`` folder). Ground truth that is not on disk is None (not scored)."""
        d = self.defaults

        def under(relative: Optional[str]) -> Optional[str]:
            if relative is None or benchmark_dir is None:
                return None
            return os.path.join(benchmark_dir, relative.format(model_id=model_id))

        default_annotations = under(d.annotations)
        if default_annotations is not None and not os.path.exists(default_annotations):
            default_annotations = None
        submission = under(f"answers_upload/{d.submission}") if d.submission else None
        return BenchmarkFiles(
            question_file=question_file or under(d.question_file),
            image_folder=image_folder or under(d.image_folder),
            annotations=annotations or default_annotations,
            answers_file=answers_file or under(f"answers/{model_id}.jsonl"),
            submission_file=submission_file or submission,
            prompt_suffix=prompt_suffix)

    def suffix(self, files: BenchmarkFiles) -> str:
        return self.defaults.prompt_suffix if files.prompt_suffix is None else files.prompt_suffix

    # -------------------------------------------------------------- questions

    def read_questions(self, files: BenchmarkFiles) -> list[dict]:
        raise NotImplementedError

    def prepare_images(self, questions: list[dict], files: BenchmarkFiles) -> None:
        """Make the images the questions name exist (MMBench decodes its TSV's); default none."""

    def answer_key(self, record: Mapping) -> str:
        return default_answer_key(record)

    # -------------------------------------------------------------- answers

    def align(self, questions: list[dict], files: BenchmarkFiles) -> list[Optional[dict]]:
        return align_answers(questions, files.answers_file, self.answer_key, self.name,
                             files.question_file)

    def score(self, questions: list[dict], answers: list[Optional[dict]],
              files: BenchmarkFiles) -> dict:
        """The report (base.report); without ground truth only the counts."""
        return report(self.name, questions, answers, {},
                      note="no ground truth for this split: not scored")

    def submission(self, questions: list[dict], answers: list[Optional[dict]],
                   files: BenchmarkFiles) -> Optional[str]:
        """Write the benchmark server's file; returns its path (None: this benchmark has none)."""
        return None

    def format(self, result: dict) -> str:
        """The report as the lines eval prints."""
        return format_report(result)

    def evaluate(self, files: BenchmarkFiles, questions: Optional[list[dict]] = None) -> dict:
        """Read the answers file, score it, write the submission file: the report."""
        questions = self.read_questions(files) if questions is None else questions
        answers = self.align(questions, files)
        result = self.score(questions, answers, files)
        path = self.submission(questions, answers, files)
        if path is not None:
            result["submission_file"] = path
        result["answers_file"] = files.answers_file
        return result
