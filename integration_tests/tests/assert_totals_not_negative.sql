select * from {{ ref('customers') }} where total_amount < 0
