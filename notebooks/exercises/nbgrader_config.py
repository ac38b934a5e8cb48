# nbgrader configuration for the chapter's labs.
#
# `python -m chapter11 labs` (make labs) copies this file into the course
# folder it builds (build/labs/) and sets CourseDirectory.root there; run
# nbgrader's own commands from that folder, e.g.
#     cd build/labs && nbgrader autograde lab_01_sparsity
# To run a course elsewhere, copy this file and notebooks/exercises/source/
# into your course folder.
c = get_config()  # noqa: F821 (provided by traitlets when nbgrader loads the file)

c.CourseDirectory.course_id = "chapter11-pruning"
c.CourseDirectory.source_directory = "source"
c.CourseDirectory.release_directory = "release"
c.CourseDirectory.submitted_directory = "submitted"
c.CourseDirectory.autograded_directory = "autograded"

# The labs' own settings, for the nbgrader command being run:
# - a cell may run 2 minutes in the function labs, 20 in the projects (which
#   fine-tune models and run an LLM): the labs named on the command line
#   decide, e.g. `nbgrader autograde lab_04_csr`; none named, 20 minutes;
# - `nbgrader autograde` first computes the dense references the project
#   graders compare with, here, before any submission runs, and hands them to
#   every kernel in the environment (CH11_LABS_REFERENCES), so no submission
#   can change them by writing into the cache. A course that keeps its own
#   nbgrader_config.py should keep these three lines.
import sys  # noqa: E402

from chapter11.labs import configure_nbgrader  # noqa: E402

configure_nbgrader(c, sys.argv)
# Student code may print a lot while training; keep the graded notebooks readable.
c.LimitOutput.max_lines = 200
