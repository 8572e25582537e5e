"""The pure core: the prompt parser, the workflow builder, the model configuration, the image
grid (composition and encoding) and the fair queue policy. No sockets, no clock, no database.

May import nothing of fategen but `fategen.errors` (checked by ``nox -s lint``).
"""
