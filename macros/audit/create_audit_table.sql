{#-
  dbt_defer.create_audit_table(relation): create the warehouse audit table when it does not
  exist yet (vars: dbt_defer: audit_table: true). Called by the dbt-defer plugin at the end of
  a deferred run, with relation = <target schema>.dbt_defer_audit. Column types come from
  dbt's cross-database type macros; override per adapter with <adapter>__create_audit_table.
-#}
{% macro create_audit_table(relation) %}
  {{- return(adapter.dispatch('create_audit_table', 'dbt_defer')(relation)) -}}
{% endmacro %}

{% macro default__create_audit_table(relation) %}
  {%- do adapter.create_schema(relation) -%}
  {%- call statement('dbt_defer_create_audit_table') -%}
    create table if not exists {{ relation }} (
      invocation_id {{ dbt.type_string() }},
      generated_at {{ dbt.type_timestamp() }},
      target_name {{ dbt.type_string() }},
      command {{ dbt.type_string() }},
      node {{ dbt.type_string() }},
      ref {{ dbt.type_string() }},
      env {{ dbt.type_string() }},
      relation {{ dbt.type_string() }},
      reason {{ dbt.type_string() }},
      row_limit {{ dbt.type_bigint() }},
      cross_environment {{ dbt.type_boolean() }}
    )
  {%- endcall -%}
{% endmacro %}
