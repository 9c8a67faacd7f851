"""Health-only telemetry: the box's figures to a local file or the fleet's MQTT broker.

Nothing here imports the gallery, audit or web packages (an import-linter contract checks it),
so the publisher has no path to names, cases, images or embeddings; and the schema it
publishes (``schema.py``) has no field that could hold them.
"""
