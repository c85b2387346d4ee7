"""The REST API: DRF views over the model verbs, plus routes with LocalAI's own paths and shapes."""
