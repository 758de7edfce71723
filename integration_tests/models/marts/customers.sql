select c.customer_id, c.first_name, coalesce(t.order_count, 0) as order_count,
       coalesce(t.total_amount, 0) as total_amount
from {{ ref('stg_customers') }} c
left join {{ ref('int_order_totals') }} t on t.customer_id = c.customer_id
