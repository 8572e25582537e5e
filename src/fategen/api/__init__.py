"""The HTTP face: the quart-trio app, its blueprints by resource (jobs, models, health),
authentication, the request/response schemas and the front desk the routes talk to.

May import `fategen.queue`, `fategen.store`, `fategen.core`, `fategen.settings` and
`fategen.errors`; only `fategen.service` imports it.
"""
