"""Search attributes set on every billing workflow (registered by the dev server and compose)."""

from temporalio.common import SearchAttributeKey

ORG_ID = SearchAttributeKey.for_keyword("OrgId")
STRIPE_EVENT_TYPE = SearchAttributeKey.for_keyword("StripeEventType")
