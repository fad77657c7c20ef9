"""prunelab's database: SQLAlchemy models, engines, repository functions, migrations."""

from prunelab.db.engine import (
    DatabaseUnavailableError,
    check_db_url,
    default_db_url,
    init_db,
    make_engine,
    normalize_db_url,
    session_factory,
)
from prunelab.db.models import (
    SWEEP_STATUSES,
    TRIAL_STATUSES,
    Base,
    Sweep,
    SweepTrial,
    Trial,
)

__all__ = [
    "SWEEP_STATUSES",
    "TRIAL_STATUSES",
    "Base",
    "DatabaseUnavailableError",
    "Sweep",
    "SweepTrial",
    "Trial",
    "check_db_url",
    "default_db_url",
    "init_db",
    "make_engine",
    "normalize_db_url",
    "session_factory",
]
