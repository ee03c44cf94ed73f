"""Which organization a Stripe event belongs to (SPEC §5.5): one order for every event family.

Activities read the candidates (what the payload and Stripe's objects say, what the engine
already knows) and call `resolve_org`; the customer link is read only when nothing before it
names an organization (`needs_customer_link`), since it comes last.
"""

from __future__ import annotations

from collections.abc import Sequence

from billing.stripe.objects import Obj, org_from


def resolve_org(
    *,
    recorded: str | None = None,
    named: str | None = None,
    objects: Sequence[Obj | None] = (),
    payment_intent: Obj | None = None,
    subscription_org: str | None = None,
    customer_org: str | None = None,
) -> str | None:
    """The organization of a Stripe event, in this order, first found wins:

    1. `recorded`: the engine's own record of the payment (the lots a purchase opened; the
       checkout record of §5.9 belongs here once it exists);
    2. `metadata.org_id` (or the seed's `organizationId`) on the event's object: `named`, what
       the workflow already read from the payload, then `objects` (the Checkout session, the
       charge, the invoice's subscription, as Stripe holds them);
    3. the metadata of the payment intent (`payment_intent`);
    4. `subscription_org`: the organization of a subscription the engine already knows;
    5. last, `customer_org`: the organization linked to the Stripe customer.

    A customer link never overrides an organization that metadata names: one Stripe customer
    may pay for several organizations.

    >>> acme = {"metadata": {"org_id": "acme"}}
    >>> resolve_org(objects=[acme], customer_org="globex")
    'acme'
    >>> resolve_org(objects=[{"metadata": {}}, None], payment_intent=acme,
    ...             customer_org="globex")
    'acme'
    >>> resolve_org(named="acme", subscription_org="globex")
    'acme'
    >>> resolve_org(objects=[{"metadata": {"organizationId": "initech"}}],
    ...             subscription_org="globex")
    'initech'
    >>> resolve_org(subscription_org="acme", customer_org="globex")
    'acme'
    >>> resolve_org(customer_org="globex")
    'globex'
    >>> resolve_org(recorded="acme", named="globex")
    'acme'
    >>> resolve_org(objects=[{"metadata": {"org_id": "not valid!"}}]) is None
    True
    """
    return (recorded or named or org_from(*objects) or org_from(payment_intent)
            or subscription_org or customer_org)


def needs_customer_link(
    *,
    recorded: str | None = None,
    named: str | None = None,
    objects: Sequence[Obj | None] = (),
    payment_intent: Obj | None = None,
    subscription_org: str | None = None,
) -> bool:
    """Whether only the customer link can still decide (nothing before it names one), so an
    activity reads the link only then.

    >>> needs_customer_link(objects=[{"metadata": {"org_id": "acme"}}])
    False
    >>> needs_customer_link(objects=[{"metadata": {}}], payment_intent=None)
    True
    """
    return resolve_org(recorded=recorded, named=named, objects=objects,
                       payment_intent=payment_intent, subscription_org=subscription_org) is None
