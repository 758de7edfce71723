{{ config(materialized='view') }}
select customer_id, first_name, last_name, customer_lifetime_value
from {{ ref('customers') }}
order by customer_lifetime_value desc
limit 10
