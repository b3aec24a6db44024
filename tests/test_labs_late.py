"""The course labs of chapters 07-12: the per-chapter tests of tests/test_labs.py (which runs chapters 00-06
and the checks over all chapters), in a file of their own so that pytest-xdist gives the two halves to two
workers."""

from test_labs import (  # noqa: F401 (collected here with this file's ``lab``)
    CHAPTERS,
    EARLY,
    lab_fixture,
    test_exercises_are_in_nbgrader_format,
    test_one_solution_put_back_scores_its_points_and_a_wrong_answer_none,
    test_the_solved_chapter_scores_full_marks,
    test_the_student_version_holds_no_solution_and_no_hidden_test,
    test_the_student_version_scores_zero_and_fails_on_the_stubs,
)

LATE = [p for p in CHAPTERS if p not in EARLY]
lab = lab_fixture(LATE)


def test_the_two_files_cover_every_chapter_once():
    assert sorted(EARLY + LATE) == CHAPTERS and not set(EARLY) & set(LATE) and EARLY and LATE
