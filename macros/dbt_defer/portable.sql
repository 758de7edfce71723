{#-
  dbt_defer.portable_relations: the existence listing of the portable mode (`dbt-defer state`,
  SPEC §11), run by dbt-defer as `dbt run-operation dbt_defer.portable_relations --args
  '{schemas: [[database, schema], ...]}'` through whatever engine the user runs (dbt Core v2 or
  dbt 1.x), so the listing goes through that engine's own adapter: one metadata query per schema
  (list_relations_without_caching), read only. It logs one line with the running target's names,
  then one line per schema (in chunks) with the identifiers found there; dbt-defer reads them.
-#}
{% macro portable_relations(schemas) %}
  {%- do log('dbt-defer-portable ' ~ tojson({'kind': 'target', 'name': target.name, 'database': target.database, 'schema': target.schema, 'type': target.type}), info=True) -%}
  {%- for pair in schemas -%}
    {%- set database = pair[0] if pair[0] else target.database -%}
    {%- set schema_relation = api.Relation.create(database=database, schema=pair[1]) -%}
    {%- set found = [] -%}
    {%- for relation in adapter.list_relations_without_caching(schema_relation) -%}
      {%- do found.append(relation.identifier) -%}
    {%- endfor -%}
    {%- if found | length == 0 -%}
      {%- do log('dbt-defer-portable ' ~ tojson({'kind': 'schema', 'database': pair[0], 'schema': pair[1], 'identifiers': []}), info=True) -%}
    {%- endif -%}
    {%- for chunk in found | batch(500) -%}
      {%- do log('dbt-defer-portable ' ~ tojson({'kind': 'schema', 'database': pair[0], 'schema': pair[1], 'identifiers': chunk}), info=True) -%}
    {%- endfor -%}
  {%- endfor -%}
{% endmacro %}
