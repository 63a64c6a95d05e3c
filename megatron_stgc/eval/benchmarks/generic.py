"""A generic LLaVA question file (``model_vqa`` layout) scored by exact match per category.

``--question-file`` (``question_id, image (optional), text, category``), images under
``--image-folder`` (default: the training ``--image-root``, as before), and optionally
``--ground-truth`` / ``--annotations`` (``question_id, answer (string or list), category``):
``eval/scoring.py``'s VQA-normalised exact match, the digits main job's metric. No prompt
suffix unless ``--prompt-suffix`` gives one; answers of 128 new tokens at most.
"""

from __future__ import annotations

from megatron_stgc.eval import scoring
from megatron_stgc.eval.benchmarks.base import BenchmarkError, Defaults, counts, format_report
from megatron_stgc.eval.benchmarks.benchmark import Benchmark
from megatron_stgc.eval.benchmarks.llava_questions import read_llava_questions


class GenericLlava(Benchmark):
    name = "llava"
    defaults = Defaults("questions.jsonl", None, None, "", 128)

    def read_questions(self, files):
        return read_llava_questions(files.question_file, self.suffix(files), needs_image=False)

    def score(self, questions, answers, files):
        if files.annotations is None:
            return super().score(questions, answers, files)
        try:
            result = scoring.score([a for a in answers if a is not None], files.annotations)
        except ValueError as error:  # scoring names the file/record; our error type
            raise BenchmarkError(f"ground truth {files.annotations}: {error}") from None
        # the exact-match result keeps its own keys ("overall", "per_category"), which the
        # tools read; the shared counts are added
        return dict(result, benchmark=self.name, counts=counts(questions, answers),
                    metrics={"accuracy": 100 * result["overall"]["accuracy"]})

    def format(self, result):
        if "overall" not in result:
            return format_report(result)
        rows = sorted(result["per_category"].items()) + [("overall", result["overall"])]
        lines = [f"eval: {name:>20} {100 * row['accuracy']:5.1f}% ({row['correct']}/"
                 f"{row['total']}, missing {row['missing']}, errors {row['errors']})"
                 for name, row in rows]
        return "\n".join(lines + [f"eval: missing images {result['counts']['missing_images']}"])
