"""Database URLs as settings read them: the drivers statesweep maps Airflow's spellings onto,
and a check of a plain URL that needs no SQLAlchemy.

Every process reads its settings first, the CLI included; importing SQLAlchemy only to parse a
URL was the largest share of an empty `statesweep cleanup --wait`. A URL this module cannot
vouch for goes to workers.db.check_connect_options, the full check, so an error reads the same
whichever path found it.
"""

from __future__ import annotations

import importlib.util
import re

# Every spelling Airflow documents for the databases statesweep serves, mapped onto the drivers
# statesweep installs and is tested with: psycopg 3 and PyMySQL. Both take the same connection
# query options as the drivers they stand in for (libpq's sslmode, sslrootcert, connect_timeout,
# options; MySQL's charset, ssl_ca, …), so the query string is kept as written.
DRIVERS = {
    "postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg",
    "postgresql+psycopg": "postgresql+psycopg", "postgresql+psycopg2": "postgresql+psycopg",
    "postgres+psycopg2": "postgresql+psycopg", "postgresql+psycopg2cffi": "postgresql+psycopg",
    "mysql": "mysql+pymysql", "mysql+pymysql": "mysql+pymysql", "mysql+mysqldb": "mysql+pymysql",
    "mysql+mysqlconnector": "mysql+pymysql",
    "mariadb": "mariadb+pymysql", "mariadb+pymysql": "mariadb+pymysql",
    "mariadb+mysqldb": "mariadb+pymysql", "mariadb+mysqlconnector": "mariadb+pymysql",
    "sqlite": "sqlite", "sqlite+pysqlite": "sqlite",
}
SUPPORTED = ("postgresql:// (also postgres://, +psycopg2, +psycopg), "
             "mysql:// (also mariadb://, +mysqldb, +mysqlconnector, +pymysql) or sqlite:///")
MISSING_DRIVER = {
    "pymysql": "needs PyMySQL, statesweep's MySQL driver: pip install 'statesweep[mysql]'",
    "psycopg": "needs psycopg 3, statesweep's PostgreSQL driver: pip install statesweep",
}

# A subset of what SQLAlchemy's make_url parses: scheme, optional user[:password]@, a host
# (or [IPv6]), an optional numeric port, a database and no query. Whatever this does not match
# (a query string, an empty port, no database, …) takes the full check.
_PLAIN = re.compile(r"(?P<scheme>[\w+]+)://(?:[^:/@]*(?::[^@]*)?@)?"
                    r"(?:\[[^/?\]]+\]|[^/:?@\[]+)?(?::\d{1,5})?/(?P<database>[^?]+)")


def check_database_url(url: str) -> None:
    """ValueError if statesweep cannot use *url* (the message never quotes it): for a plain
    URL, whether its driver is installed (found, not imported: psycopg alone is a sixth of the
    CLI's start-up); for any other, workers.db.check_connect_options."""
    plain = _PLAIN.fullmatch(url)
    driver = DRIVERS.get(plain["scheme"].lower()) if plain else None
    if plain is None or driver is None or plain["database"] == ":memory:":
        from workers.db import check_connect_options

        check_connect_options(url)
        return
    dbapi = driver.partition("+")[2]
    if dbapi and importlib.util.find_spec(dbapi) is None:
        raise ValueError(MISSING_DRIVER.get(dbapi, f"needs the {dbapi} driver"))
