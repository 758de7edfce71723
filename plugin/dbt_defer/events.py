"""dbt-defer's log lines, through dbt's event system (``Note`` events): they appear in dbt's
console output and logs/dbt.log at the level given, and reach ``dbtRunner`` callbacks.
Imports dbt_common only.
"""

from __future__ import annotations

from dbt_common.events.base_types import EventLevel
from dbt_common.events.functions import fire_event
from dbt_common.events.types import Note


def log(msg: str, level: EventLevel = EventLevel.INFO) -> None:
    fire_event(Note(msg=msg), level=level)


def warn(line: str) -> None:
    log(line, EventLevel.WARN)
