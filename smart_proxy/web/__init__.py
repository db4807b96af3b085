"""HTTP: the edge every request passes, the model routes on raw ASGI, and the Quart-Trio app for the rest."""
