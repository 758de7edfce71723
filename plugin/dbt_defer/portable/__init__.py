"""The portable mode (SPEC §11): the chain for engines that load no Python plugin (dbt Core v2,
the engine behind dbt Fusion; also dbt 1.x without the plugin).

Before the engine starts, dbt-defer computes the chain's choice for every node and writes one
merged deferral manifest (``state``); the engine then runs with ``--defer --defer-state DIR
--favor-state`` and reads each unselected ref from the chain's choice (``run``). Everything here
is engine-independent and imports nothing of dbt-core 1.x: the engine is a subprocess
(``engine``), the project is its own ``manifest.json`` (``project``), and the rules, the chain,
the guard and the audit are the package's own modules, shared with the plugin.
"""
