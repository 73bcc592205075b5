"""Flow control's building blocks, each pure and testable on its own: how far behind the
replicas are (:mod:`.lag`), whether the active-hours window is open (:mod:`.hours`), how long a
``--for`` pause lasts (:mod:`.durations`) and how big the next chunk should be
(:mod:`.sizing`). None of them sends, holds or deletes anything; the dispatch path asks them
and decides, so each rule is tested here without a broker or a worker."""
