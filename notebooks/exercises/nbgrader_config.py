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

# Project labs fine-tune models and run an LLM: allow a cell up to 20 minutes.
c.Execute.timeout = 1200
# Student code may print a lot while training; keep the graded notebooks readable.
c.LimitOutput.max_lines = 200
