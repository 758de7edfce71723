{#-
  dbt_defer.ref: what your root project's `ref` routes through (the one-line shim in
  macros/ref.sql of your project). Takes what dbt's ref takes: one or two names and
  version= / v=. The chain resolution itself (SPEC §4) happens in the dbt-defer plugin,
  inside dbt's own ref resolver, so every ref resolves the same way; this macro is the
  dispatch point if an adapter or project needs to adjust the returned relation.
-#}
{% macro ref() %}
  {{- return(adapter.dispatch('ref', 'dbt_defer')(*varargs, **kwargs)) -}}
{% endmacro %}

{% macro default__ref() %}
  {{- return(builtins.ref(*varargs, **kwargs)) -}}
{% endmacro %}
