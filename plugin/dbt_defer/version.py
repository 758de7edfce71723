"""The version of dbt-defer (also in pyproject.toml): the package, the CLI and the audit say it."""

__version__ = "0.1.0"
