"""Exit codes of every statesweep process: the CLI, and worker and beat failing at start-up."""

# 1 is left to Python and click for unexpected errors.
EXIT_OK = 0
EXIT_FAILURE = 1  # an unexpected error (the traceback says where), or a run or task failed
EXIT_USAGE = 2  # click's own: an unknown option or a missing argument
EXIT_SETTINGS = 3  # a STATESWEEP_* / AIRFLOW__* setting is invalid, or (worker, beat) names no
#                 shared run store, or a Redis older than 7 or one that may evict keys
EXIT_SCHEMA = 4  # the database lacks the tables or columns statesweep needs, or its user lacks
#                SELECT or DELETE on them
EXIT_REFUSED = 5  # statesweep refused to act (e.g. alter an Airflow database, or a run is active)
EXIT_BAD_ARGUMENT = 6  # an argument is invalid, or names a run that does not exist
EXIT_UNHEALTHY = 7  # `doctor` found a problem
EXIT_UNAVAILABLE = 8  # a database, broker or run store could not be reached
EXIT_ABORTED = 9  # the followed run was aborted (`statesweep abort`) before it finished
EXIT_STUCK = 10  # the followed run cannot finish as things stand: no worker took it, it stalled
#                 past the pump's re-sends, or its record vanished (it may go on; say so)
EXIT_INTERRUPTED = 130  # Ctrl-C: following stopped (a dispatched run goes on)
