{{ config(materialized='view') }}
select id, count(*) as n
from {{ ref('model_a') }}
group by 1
