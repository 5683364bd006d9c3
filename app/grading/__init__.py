"""Grading: pull the final answer out of a solution (`extract`) and decide whether it equals the gold answer
(`verify`, math-verify under a time limit); `batch` grades many pairs at once on Ray."""
from app.grading.batch import grade_batch
from app.grading.extract import boxed_contents, extract_answer, last_boxed
from app.grading.verify import (DEFAULT_TIMEOUT, GradeStats, answers_equivalent, grade, grade_stats, normalize_answer,
                                reset_grade_stats)

__all__ = ["DEFAULT_TIMEOUT", "GradeStats", "answers_equivalent", "boxed_contents", "extract_answer", "grade",
           "grade_batch", "grade_stats", "last_boxed", "normalize_answer", "reset_grade_stats"]
