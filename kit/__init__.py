"""The course kit: the parts of rf.py a student writes, a student copy made from the live file, and a grader."""
