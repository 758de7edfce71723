{% if var('break_orders', false) %}
select * from a_relation_that_does_not_exist
{% else %}
select o.order_id, o.customer_id, o.order_date, o.amount
from {{ ref('dbt_defer_integration_tests', 'stg_orders') }} o
{% endif %}
