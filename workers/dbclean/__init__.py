"""``statesweep db-clean``: Airflow's ``airflow db clean`` for its metadata tables, with each
chunk's archive and delete in one transaction.

- ``rules``: Airflow's table rules as data, per Airflow version (3.3, 3.4).
- ``statements``: every statement db-clean runs, built from a rule and the live table.
- ``run``: a run in this process: plan each table's chunks, move each chunk.
- ``archives``: list, export and drop archive tables.
"""
