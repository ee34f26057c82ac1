"""The application layer: the CLI, the local-stack launcher and the demo.

They compose the services and jobs; nothing below this layer imports it.
"""
