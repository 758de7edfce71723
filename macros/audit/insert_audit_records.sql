{#-
  dbt_defer.insert_audit_records(relation, rows): append audit rows to the warehouse audit
  table. Each row is a mapping with the columns of dbt_defer.create_audit_table; the plugin
  sends at most 500 rows per call. Strings go through dbt_defer.audit_string_literal (quotes
  escaped), numbers and booleans are rendered as literals, None as a typed null.
-#}
{% macro insert_audit_records(relation, rows) %}
  {{- return(adapter.dispatch('insert_audit_records', 'dbt_defer')(relation, rows)) -}}
{% endmacro %}

{% macro default__insert_audit_records(relation, rows) %}
  {%- if rows | length > 0 -%}
  {%- call statement('dbt_defer_insert_audit_records') -%}
    insert into {{ relation }}
      (invocation_id, generated_at, target_name, command, node, ref, env, relation, reason, row_limit, cross_environment)
    values
    {%- for row in rows %}
      (
        {{- dbt_defer.audit_string_literal(row['invocation_id']) }},
        cast({{ dbt_defer.audit_string_literal(row['generated_at']) }} as {{ dbt.type_timestamp() }}),
        {{ dbt_defer.audit_string_literal(row['target_name']) }},
        {{ dbt_defer.audit_string_literal(row['command']) }},
        {{ dbt_defer.audit_string_literal(row['node']) }},
        {{ dbt_defer.audit_string_literal(row['ref']) }},
        {{ dbt_defer.audit_string_literal(row['env']) }},
        {{ dbt_defer.audit_string_literal(row['relation']) }},
        {{ dbt_defer.audit_string_literal(row['reason']) }},
        {% if row['row_limit'] is none %}cast(null as {{ dbt.type_bigint() }}){% else %}{{ row['row_limit'] | int }}{% endif %},
        {{ 'true' if row['cross_environment'] else 'false' -}}
      ){{ ',' if not loop.last }}
    {%- endfor %}
  {%- endcall -%}
  {%- endif -%}
{% endmacro %}
