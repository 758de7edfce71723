{#-
  dbt_defer.audit_string_literal(value): a SQL string literal for value (quotes escaped through
  dbt.escape_single_quotes, which each adapter implements for its dialect), or a typed null.
-#}
{% macro audit_string_literal(value) %}
  {{- return(adapter.dispatch('audit_string_literal', 'dbt_defer')(value)) -}}
{% endmacro %}

{% macro default__audit_string_literal(value) %}
  {%- if value is none -%}
    {{- return('cast(null as ' ~ dbt.type_string() ~ ')') -}}
  {%- else -%}
    {{- return("'" ~ dbt.escape_single_quotes(value | string) ~ "'") -}}
  {%- endif -%}
{% endmacro %}
