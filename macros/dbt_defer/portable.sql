{#-
  dbt_defer.portable_relations: the existence listing of the portable mode (`dbt-defer state`,
  SPEC §11), run by dbt-defer as `dbt run-operation dbt_defer.portable_relations --args
  '{schemas: [[database, schema], ...], extra: [...]}'` through whatever engine the user runs (dbt Core v2 or
  dbt 1.x), so the listing goes through that engine's own adapter: one metadata query per schema
  (dbt 1.x: adapter.list_relations, through its relation cache; v2:
  list_relations_without_caching), read only. It logs one line with the running target's names,
  then one line per schema (in chunks) with the identifiers found there; dbt-defer reads them.
-#}
{% macro portable_relations(schemas, extra=[], dev_schemas=false) %}
  {#- dev_schemas: also every schema the project's refable nodes write for the running target
      (from `graph`), so this call need not wait for the project's manifest -#}
  {%- if dev_schemas -%}
    {%- set schemas = schemas | list -%}
    {%- for node in graph.nodes.values() if node.resource_type in ('model', 'seed', 'snapshot') -%}
      {%- set pair = [node.database or '', node.schema or ''] -%}
      {%- if pair not in schemas -%}{%- do schemas.append(pair) -%}{%- endif -%}
    {%- endfor -%}
  {%- endif -%}
  {%- do log('dbt-defer-portable ' ~ tojson({'kind': 'target', 'name': target.name, 'database': target.database, 'schema': target.schema, 'type': target.type, 'dbt_version': dbt_version | string}), info=True) -%}
  {%- for pair in schemas -%}
    {%- set database = pair[0] if pair[0] else target.database -%}
    {%- set found = [] -%}
    {%- if (dbt_version | string).startswith('1.') -%}
      {#- dbt 1.x has no listing in Jinja: get_relation, through its relation cache (the first
          call lists the schema, one query; the rest are cache look-ups), for every identifier
          the project's refable nodes have, plus `extra` ([database, schema, identifier]: an
          environment's identifier the project does not use) -#}
      {%- set names = [] -%}
      {%- for node in graph.nodes.values() if node.resource_type in ('model', 'seed', 'snapshot') -%}
        {%- do names.append(node.alias or node.name) -%}
      {%- endfor -%}
      {%- for item in extra if item[1] == pair[1] and (item[0] or target.database) == database -%}
        {%- do names.append(item[2]) -%}
      {%- endfor -%}
      {%- set relations = [] -%}
      {%- for name in names | unique -%}
        {%- set relation = adapter.get_relation(database=database, schema=pair[1], identifier=name) -%}
        {%- if relation is not none -%}{%- do relations.append(relation) -%}{%- endif -%}
      {%- endfor -%}
    {%- else -%}
      {%- set relations = adapter.list_relations_without_caching(api.Relation.create(database=database, schema=pair[1])) -%}
    {%- endif -%}
    {%- for relation in relations -%}
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

{#-
  dbt_defer.portable_limited_views: the row limits of the portable mode (SPEC §6, §11). For each
  ref the chain reads from another environment under a target with `limits`, dbt-defer asks the
  engine to (re)create a view in a scratch schema of the running (dev) target,
  `<target schema>_dd_<environment>_<schema>`, with the referenced relation's own identifier:
  `select * from <environment's relation> limit N`. The merged state points the node at that
  view, so every ref renders a plain relation name: aliases (`ref('x') y`, `as y`), subqueries
  and `x.col` keep working on every engine. Views only: nothing is copied.
  views: [{src: [database, schema, identifier], dst: [database, schema, identifier], limit: N, uid: ...}]
-#}
{% macro portable_limited_views(views) %}
  {%- set schemas = [] -%}
  {%- for view in views -%}
    {%- set key = (view.dst[0] ~ '.' ~ view.dst[1]) | lower -%}
    {%- if key not in schemas -%}
      {%- do schemas.append(key) -%}
      {%- do adapter.create_schema(api.Relation.create(database=view.dst[0], schema=view.dst[1])) -%}
    {%- endif -%}
    {%- set src = api.Relation.create(database=view.src[0], schema=view.src[1], identifier=view.src[2]) -%}
    {%- set dst = api.Relation.create(database=view.dst[0], schema=view.dst[1], identifier=view.dst[2], type='view') -%}
    {%- do run_query('drop view if exists ' ~ dst) -%}
    {%- do run_query('create view ' ~ dst ~ ' as select * from ' ~ src ~ ' limit ' ~ (view.limit | int)) -%}
    {%- do log('dbt-defer-portable ' ~ tojson({'kind': 'view', 'uid': view.uid, 'relation': dst | string}), info=True) -%}
  {%- endfor -%}
  {%- if (dbt_version | string).startswith('1.') -%}{%- do adapter.commit() -%}{%- endif -%}
{% endmacro %}
