"""The guarantee checker: seeded random schedules of real processes and faults,
and a checker of what every process logged against the README's guarantees.

Modules, one idea each:

* `schedule`: a seeded random schedule (processes, their start times, timed faults).
* `agent`: the program each process runs (`python -m tests.guarantees.agent PLAN`).
* `driver`: runs one schedule and collects the logs.
* `history`: reads the logs back.
* `checker`: verifies the guarantees on a history; each violation is a sentence.
* `shrink`: delta debugging of a failing schedule.
* `__main__`: the soak command (`python -m tests.guarantees --help`).

See docs/reliability.md, "The guarantee checker".
"""
