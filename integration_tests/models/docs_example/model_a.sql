select customer_id as id from {{ ref('stg_customers') }}
