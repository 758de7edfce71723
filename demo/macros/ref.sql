{% macro ref() %}{{ return(dbt_defer.ref(*varargs, **kwargs)) }}{% endmacro %}
