select 2024 as calendar_year
