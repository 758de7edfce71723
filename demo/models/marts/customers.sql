with customer_orders as (
    select
        customer_id,
        min(order_date) as first_order,
        max(order_date) as most_recent_order,
        count(order_id) as number_of_orders
    from {{ ref('stg_orders') }}
    group by customer_id
),

customer_payments as (
    select
        o.customer_id,
        sum(p.amount) as total_amount
    from {{ ref('stg_payments') }} p
    join {{ ref('stg_orders') }} o on o.order_id = p.order_id
    group by o.customer_id
)

select
    c.customer_id,
    c.first_name,
    c.last_name,
    co.first_order,
    co.most_recent_order,
    coalesce(co.number_of_orders, 0) as number_of_orders,
    coalesce(cp.total_amount, 0) as customer_lifetime_value
from {{ ref('stg_customers') }} c
left join customer_orders co on co.customer_id = c.customer_id
left join customer_payments cp on cp.customer_id = c.customer_id
