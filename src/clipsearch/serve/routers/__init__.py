"""One router per resource: knn, indices, metadata, health (healthz + metrics), web page."""
