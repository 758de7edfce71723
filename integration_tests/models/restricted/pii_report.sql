select count(*) as n from {{ ref('pii_emails') }}
