"""The suite's dbt project: a small jaffle-shop-like project (seeds, a staging layer, marts, a
versioned model, an ephemeral model, a restricted ``pii`` model, a unit test, a second package)
written as text, its dbt_project.yml, and where the dbt_defer macro package comes from.
Imports nothing of the suite.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import pytest

PROJECT = "dbt_defer_conformance"
PACKAGE = "calendar"  # a second package, for two-argument refs into another package
ENVIRONMENTS = ("staging", "prod")  # the chain, highest priority first
STAGING_SELECTION = ("raw_customers", "raw_orders", "stg_customers", "stg_orders", "orders")
CUSTOMERS, ORDERS = 5, 8  # rows in the seeds

# --- the project ------------------------------------------------------------------------------

FILES: Dict[str, str] = {
    "macros/ref.sql": "{% macro ref() %}{{ return(dbt_defer.ref(*varargs, **kwargs)) }}{% endmacro %}\n",
    "macros/dbt_defer_testing.sql": """
{#- The suite's only way into the warehouse: dbt run-operation dbt_defer_testing_probe. -#}
{% macro dbt_defer_testing_probe(exists=[], schemas=[], counts=[], scalars=[], drop=[]) %}
  {%- set out = {"exists": [], "schemas": [], "counts": [], "scalars": []} -%}
  {%- set database = target.database if target.database is defined and target.database else none -%}
  {%- for item in exists -%}
    {%- set found = adapter.get_relation(database=database, schema=item[0], identifier=item[1]) -%}
    {%- do out["exists"].append(found is not none) -%}
  {%- endfor -%}
  {%- for schema in schemas -%}
    {%- do out["schemas"].append(adapter.check_schema_exists(database, schema)) -%}
  {%- endfor -%}
  {%- for item in counts -%}
    {%- set relation = api.Relation.create(database=database, schema=item[0], identifier=item[1]) -%}
    {%- set result = run_query("select count(*) from " ~ relation) -%}
    {%- do out["counts"].append(result.columns[0].values()[0] | int) -%}
  {%- endfor -%}
  {%- for sql in scalars -%}
    {%- set result = run_query(sql) -%}
    {%- do out["scalars"].append(result.columns[0].values()[0] | string) -%}
  {%- endfor -%}
  {%- for schema in drop -%}
    {%- do adapter.drop_schema(api.Relation.create(database=database, schema=schema)) -%}
  {%- endfor -%}
  {%- do log("dbt-defer-testing: " ~ tojson(out), info=True) -%}
{% endmacro %}
""",
    "seeds/raw_customers.csv": """id,first_name,last_name,email
1,Ada,Lovelace,ada@example.com
2,Alan,Turing,alan@example.com
3,Grace,Hopper,grace@example.com
4,Edsger,Dijkstra,edsger@example.com
5,Barbara,Liskov,barbara@example.com
""",
    "seeds/raw_orders.csv": """id,customer_id,order_date,amount
1,1,2024-01-02,10
2,1,2024-01-05,25
3,2,2024-01-07,7
4,3,2024-02-01,40
5,3,2024-02-03,12
6,4,2024-02-09,3
7,5,2024-03-01,18
8,5,2024-03-04,22
""",
    "models/staging/stg_customers.sql": (
        "select id as customer_id, first_name, last_name, email\nfrom {{ ref('raw_customers') }}\n"
    ),
    "models/staging/stg_orders.sql": (
        "select id as order_id, customer_id, cast(order_date as date) as order_date, amount\n"
        "from {{ ref('raw_orders') }}\n"
    ),
    "models/marts/int_order_totals.sql": """{{ config(materialized='ephemeral') }}
select customer_id, count(*) as order_count, sum(amount) as total_amount
from {{ ref('stg_orders') }}
group by customer_id
""",
    "models/marts/customers.sql": """select c.customer_id, c.first_name, coalesce(t.order_count, 0) as order_count,
       coalesce(t.total_amount, 0) as total_amount
from {{ ref('stg_customers') }} c
left join {{ ref('int_order_totals') }} t on t.customer_id = c.customer_id
""",
    "models/marts/orders.sql": (
        "select o.order_id, o.customer_id, o.order_date, o.amount\n"
        f"from {{{{ ref('{PROJECT}', 'stg_orders') }}}} o\n"
    ),
    "models/marts/dim_customers_v1.sql": "select customer_id, first_name from {{ ref('stg_customers') }}\n",
    "models/marts/dim_customers_v2.sql": "select customer_id, first_name, email from {{ ref('stg_customers') }}\n",
    "models/marts/customer_report.sql": f"""select d.customer_id, d.first_name, c.total_amount, cal.calendar_year
from {{{{ ref('dim_customers', v=1) }}}} d
join {{{{ ref('customers') }}}} c on c.customer_id = d.customer_id
cross join {{{{ ref('{PACKAGE}', 'calendar_years') }}}} cal
""",
    "models/marts/_marts.yml": """version: 2
models:
  - name: customers
    columns:
      - name: customer_id
        data_tests: [unique, not_null]
  - name: orders
    columns:
      - name: customer_id
        data_tests:
          - relationships:
              to: ref('customers')
              field: customer_id
  - name: dim_customers
    latest_version: 2
    versions:
      - v: 1
      - v: 2
""",
    # a custom schema (<target schema>_extra) and a mixed-case alias
    "models/marts/customer_totals.sql": (
        "{{ config(schema='extra', alias='CustomerTotals') }}\n"
        "select customer_id, total_amount from {{ ref('customers') }}\n"
    ),
    "models/restricted/pii_emails.sql": "{{ config(tags=['pii']) }}\nselect customer_id, email from {{ ref('stg_customers') }}\n",
    "models/restricted/pii_report.sql": "select count(*) as n from {{ ref('pii_emails') }}\n",
    "tests/assert_totals_not_negative.sql": "select * from {{ ref('customers') }} where total_amount < 0\n",
    f"packages/{PACKAGE}/dbt_project.yml": f"name: {PACKAGE}\nversion: '1.0'\nconfig-version: 2\n",
    f"packages/{PACKAGE}/models/calendar_years.sql": "select 2024 as calendar_year\n",
}


def write_double_it(project: Any, data_type: str, body: str = "SELECT value * 2") -> None:
    """The SQL function ``double_it(value)`` (dbt >= 1.11) in a project folder (``.write(rel, text)``)."""
    project.write("functions/double_it.sql", body + "\n")
    project.write(
        "functions/double_it.yml",
        "functions:\n  - name: double_it\n    arguments:\n"
        f"      - {{name: value, data_type: {data_type}}}\n    returns: {{data_type: {data_type}}}\n",
    )


def dbt_defer_meta(kind: str, name: str, settings: str) -> str:
    """A properties file giving one node of ``kind`` (models, seeds, snapshots) its
    ``meta: {dbt_defer: <settings>}``, e.g. ``dbt_defer_meta("seeds", "raw_customers", "{limit: null}")``."""
    return f"version: 2\n{kind}:\n  - name: {name}\n    config:\n      meta: {{dbt_defer: {settings}}}\n"


def project_yml(update: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    base: Dict[str, Any] = {
        "name": PROJECT,
        "version": "1.0",
        "config-version": 2,
        "profile": PROJECT,
        "models": {PROJECT: {"staging": {"+materialized": "view"}, "marts": {"+materialized": "table"}}},
        "vars": {"dbt_defer": {"never_defer": ["tag:pii"]}},
    }
    return _merge(base, update or {})


def _merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def save_artifacts(target: Path, dest: Path) -> Path:
    """What an environment's job publishes: manifest.json + run_results.json of ``target``,
    copied into a fresh ``dest`` folder."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in ("manifest.json", "run_results.json"):
        if (target / name).exists():
            shutil.copy(target / name, dest / name)
    return dest


def default_package_entry() -> Dict[str, str]:
    """packages.yml entry of the dbt_defer macro package: DBT_DEFER_PACKAGE_DIR, else the
    checkout this module was installed from (an editable install or a source tree)."""
    folder = os.environ.get("DBT_DEFER_PACKAGE_DIR")
    if not folder:
        here = Path(__file__).resolve().parents[3]  # plugin/dbt_defer/testing/files.py -> the checkout
        if (here / "dbt_project.yml").is_file() and (here / "macros" / "dbt_defer" / "ref.sql").is_file():
            folder = str(here)
    if not folder:
        raise pytest.UsageError(
            "dbt-defer testing: cannot find the dbt_defer macro package; set DBT_DEFER_PACKAGE_DIR to a "
            "checkout of dbt-defer, or define a dbt_defer_package fixture returning its packages.yml entry "
            "(e.g. {'git': 'https://github.com/<org>/dbt-defer.git', 'revision': 'v0.1.0'})"
        )
    return {"local": folder}
