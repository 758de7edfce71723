{#-
  dbt_defer.ref: what your root project's `ref` routes through (the one-line shim in
  macros/ref.sql of your project). Takes what dbt's ref takes: one or two names and
  version= / v=. On dbt 1.x with the plugin, the chain resolution itself (SPEC §4) happens in
  the dbt-defer plugin, inside dbt's own ref resolver, and nothing here changes what it returns.

  Portable mode (SPEC §11, `dbt-defer run`, on engines without the plugin such as dbt Core v2):
  the relation comes from the engine's --defer with the merged state dbt-defer wrote; with
  DBT_DEFER_PORTABLE set (by `dbt-defer run`) this macro logs one structured line per ref
  (`dbt-defer-ref {json}`: the calling node, the ref's names, the relation rendered), from which
  dbt-defer writes target/dbt_defer_audit.json. Row limits are views the merged state points at
  (dbt_defer.portable_limited_views); `dbt-defer run` hands this macro the views' schemas so a
  data test reads the environment's relation itself unless limit_tests is true.
-#}
{% macro ref() %}
  {{- return(adapter.dispatch('ref', 'dbt_defer')(*varargs, **kwargs)) -}}
{% endmacro %}

{% macro default__ref() %}
  {%- set relation = builtins.ref(*varargs, **kwargs) -%}
  {%- set portable = env_var('DBT_DEFER_PORTABLE', '') if execute else '' -%}
  {%- if portable -%}
    {%- if model.resource_type == 'test' and portable.startswith('{') -%}
      {#- a data test reads the environment's relation, not the limited view (limit_tests: false) -#}
      {%- set views = fromjson(portable).get('views', {}) -%}
      {%- set key = ((relation.database or '') ~ '.' ~ (relation.schema or '')) | lower -%}
      {%- if key in views -%}
        {%- set relation = api.Relation.create(database=views[key][0], schema=views[key][1], identifier=relation.identifier) -%}
      {%- endif -%}
    {%- endif -%}
    {%- set version = kwargs.get('version', kwargs.get('v')) -%}
    {%- do log('dbt-defer-ref ' ~ tojson({'node': model.unique_id, 'args': varargs | list, 'version': (version | string if version is not none else none), 'relation': relation | string}), info=True) -%}
  {%- endif -%}
  {{- return(relation) -}}
{% endmacro %}
