"""``python -m dbt_defer.cli``: the same as the ``dbt-defer`` command."""

import sys

from dbt_defer.cli import main

sys.exit(main())
