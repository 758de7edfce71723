select d.customer_id, d.first_name, c.total_amount, cal.calendar_year
from {{ ref('dim_customers', v=1) }} d
join {{ ref('customers') }} c on c.customer_id = d.customer_id
cross join {{ ref('shop_calendar', 'calendar_years') }} cal
